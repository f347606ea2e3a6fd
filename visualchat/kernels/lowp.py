"""Low-precision weight formats for the frozen LM's linear layers on CPU (decode speed).

Decoding one token reads every weight of the LM once, so on a CPU the tokens/s of a small model are
bounded by memory bandwidth / bytes of weights. Storing the frozen LM's ``nn.Linear`` weights in a
smaller format cuts those bytes; the trainable parts (projection, embedding copy), the vision
encoder, the activations, the KV cache and the logits all stay in the model's dtype (float32 on CPU).

Formats (``--dtype`` / ``VISUALCHAT_DTYPE`` in the app, ``lm_weights=`` in
``VisualChat.from_pretrained``):

- ``fp32``: the weights as loaded (nothing converted).
- ``bf16``: bfloat16 weights; each linear casts its input to bfloat16 and its output back to float32
  (oneDNN's bf16 GEMM). Needs a CPU with native bf16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``).
- ``fp16``: float16 weights, float32 activations and accumulation (fbgemm's fp16 GEMM through
  ``torch.ops.quantized.linear_dynamic_fp16``): half the bytes, and only the weights are rounded
  (11-bit mantissa). Needs torch's fbgemm engine (x86 with AVX2/F16C or better).

Measured on the shipped checkpoint (bench/RESULTS.md): fp16 weights keep greedy answers; bf16 changes
some (its activations are rounded to 8 bits of mantissa too), and int8 was tried and dropped:
per-tensor dynamic quantization of the activations broke the answers outright, and int8 weights alone
(per output channel) changed 2 of 13 answers already.

The conversion is done at load time from the float32 weights the checkpoint was trained against; the
files on disk never change, and the trainer keeps training against those float32 weights. A format
the CPU lacks falls back (with a logged reason) to the next one in :data:`FALLBACK`; ``auto`` picks
the first supported format of :data:`AUTO_ORDER` (the fastest one that met the quality bar, see
bench/RESULTS.md). On a GPU the formats do not apply: ``auto`` means the model's own dtype.

The converted weights are plain attributes of :class:`LowpLinear`, not parameters or buffers, so a
later ``module.float()`` / ``.to(dtype)`` (DeepSpeed-Inference does one) cannot silently turn them
back into float32 copies.
"""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FORMATS = ("fp32", "fp16", "bf16")
ALIASES = {"float32": "fp32", "fp32": "fp32", "float16": "fp16", "fp16": "fp16", "half": "fp16",
           "bfloat16": "bf16", "bf16": "bf16"}
#: ``auto`` on CPU: the first supported format of these, fastest first among those that meet the
#: quality bar (bench/RESULTS.md: bf16 does not, so auto never picks it).
AUTO_ORDER = ("fp16", "fp32")
#: Where an unsupported format falls back to.
FALLBACK = {"fp16": "fp32", "bf16": "fp32"}


def normalize(name: str | None) -> str:
    """``fp32`` / ``bf16`` / ``int8`` / ``auto`` from a user's spelling; ValueError naming what is allowed."""
    if name in (None, "", "auto"):
        return "auto"
    key = str(name).strip().lower()
    if key == "auto":
        return "auto"
    if key not in ALIASES:
        raise ValueError(f"LM weight format must be auto, {', '.join(FORMATS)} (or float32, float16, bfloat16), got {name!r}")
    return ALIASES[key]


# -- capability checks (tests monkeypatch these two) -----------------------------------------------
def bf16_unsupported_reason() -> str | None:
    """None when this CPU runs bf16 GEMMs natively, else why not."""
    try:
        ok = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception as e:  # an old or unusual build without the op
        return f"torch cannot tell whether this CPU has bf16 ({type(e).__name__}: {e})"
    return None if ok else "this CPU has no native bf16 (torch.ops.mkldnn._is_mkldnn_bf16_supported() is False)"


def fp16_unsupported_reason() -> str | None:
    """None when torch's fbgemm fp16-weight linear runs here (tried on a tiny matrix), else why not."""
    engines = torch.backends.quantized.supported_engines
    if "fbgemm" not in engines:
        return f"torch has no fbgemm engine here (engines: {', '.join(engines)})"
    try:
        w = torch.linspace(-1, 1, 64).reshape(8, 8)
        y = _Fp16(w, None)(torch.ones(1, 8))
        if not torch.allclose(y, torch.ones(1, 8) @ w.T, atol=1e-2):
            return "torch's fp16-weight linear gave wrong results on a test matrix"
    except Exception as e:
        return f"torch's fp16-weight linear kernel failed ({type(e).__name__}: {e})"
    return None


UNSUPPORTED = {"bf16": lambda: bf16_unsupported_reason(), "fp16": lambda: fp16_unsupported_reason(),
               "fp32": lambda: None}


def resolve(name: str | None, device: str | torch.device = "cpu") -> tuple[str, str | None]:
    """The format to use for ``name`` on ``device``: ``(format, note)``. ``note`` says why it differs
    from what was asked (a fallback), else None. Formats other than fp32 are CPU-only."""
    want = normalize(name)
    if torch.device(device).type != "cpu":
        if want in ("auto", "fp32"):
            return "fp32", None
        raise ValueError(f"LM weight format {want!r} is for CPU; on {device} use --dtype bfloat16/float16 instead")
    if want == "auto":
        reasons = []
        for fmt in AUTO_ORDER:
            why = UNSUPPORTED[fmt]()
            if why is None:
                return fmt, ("; ".join(reasons) or None)
            reasons.append(f"{fmt}: {why}")
        return "fp32", "; ".join(reasons)
    fmt, reasons = want, []
    while True:
        why = UNSUPPORTED[fmt]()
        if why is None:
            return fmt, ("; ".join(reasons) or None)
        reasons.append(f"{fmt} unavailable ({why}), using {FALLBACK[fmt]}")
        fmt = FALLBACK[fmt]


# -- the converted linear layers --------------------------------------------------------------------
class LowpLinear(nn.Module):
    """A frozen linear layer with its weight in another format; float32 in, float32 out."""

    fmt = "fp32"

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}"


class _Bf16(LowpLinear):
    fmt = "bf16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0])
        self.w = weight.detach().to(torch.bfloat16).contiguous()
        self.b = None if bias is None else bias.detach().to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.w, self.b).to(x.dtype)


class _Fp16(LowpLinear):
    fmt = "fp16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight.shape[1], weight.shape[0])
        w = weight.detach().float()
        big = torch.finfo(torch.float16).max
        if w.max() > big or w.min() < -big:  # (no abs(): that would copy the weight)
            raise ValueError("a weight is beyond float16's range; use fp32 or bf16")
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, None if bias is None else bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).to(x.dtype)


CLASSES = {"bf16": _Bf16, "fp16": _Fp16}  # the low-precision linear layer of each format

#: Sibling linear layers that read the same input and are converted into one matrix (one GEMM call
#: instead of three or two: each call has a fixed cost that dominates a decode step's small GEMMs).
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class Fused:
    """Several linear layers that read the same input, stored as one converted matrix (their rows
    stacked). ``fused(x)`` gives all their outputs side by side (what the lean decode step uses);
    each layer's :class:`_Part` gives its own slice. A plain object, not a module: its bytes are
    counted once, through its parts."""

    def __init__(self, fmt: str, weights: list[torch.Tensor], biases: list[torch.Tensor | None]):
        self.fmt = fmt
        self.sizes = [w.shape[0] for w in weights]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
        self.linear = CLASSES[fmt](torch.cat([w.detach() for w in weights]), bias)
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        # (input, its version, output, parts handed out): the last input's fused output, so that the
        # parts called one after the other on the same tensor (transformers' q_proj(h), k_proj(h),
        # v_proj(h)) share one GEMM. Dropped once every part has had it (prefill outputs are large).
        self._last = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        if x.is_inference():  # no version counter to tell an in-place change: no sharing (correct, slower)
            return self.linear(x)[..., self.offsets[i]:self.offsets[i] + self.sizes[i]]
        last = self._last  # one read: a tuple replaced whole, never changed in place
        if last is not None and last[0] is x and last[1] == x._version:
            out, taken = last[2], last[3] | {i}
        else:
            out, taken = self.linear(x), frozenset((i,))
        self._last = None if len(taken) == len(self.sizes) else (x, x._version, out, taken)
        return out[..., self.offsets[i]:self.offsets[i] + self.sizes[i]]


class _Part(LowpLinear):
    """One layer of a :class:`Fused` group (its rows of the stacked matrix)."""

    def __init__(self, group: Fused, i: int, in_features: int):
        super().__init__(in_features, group.sizes[i])
        self.fmt = group.fmt
        self.index = i
        self.group = group  # a plain object (not a submodule), shared by the group's parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.part(self.index, x)


def fused_group(*modules) -> Fused | None:
    """The :class:`Fused` group that ``modules`` are, in this order, all its parts; else None."""
    group = getattr(modules[0], "group", None)
    if not isinstance(group, Fused) or len(modules) != len(group.sizes):
        return None
    if any(not isinstance(m, _Part) or m.group is not group or m.index != i for i, m in enumerate(modules)):
        return None
    return group


def convert_lm(lm: nn.Module, fmt: str) -> int:
    """Replace every ``nn.Linear`` of the frozen LM (attention and MLP projections and the output head)
    by a :class:`LowpLinear` in ``fmt`` (a format :func:`resolve` returned). Returns how many were
    replaced. The LM's input embedding is not a linear layer and stays as it is (also when the output
    head was tied to it). Siblings of :data:`GROUPS` (q/k/v, gate/up) become the parts of one
    :class:`Fused` matrix. ``fp32`` changes nothing."""
    fmt = normalize(fmt)
    if fmt == "fp32":
        return 0
    if fmt not in CLASSES:
        raise ValueError(f"convert_lm needs a concrete format ({', '.join(FORMATS)}), got {fmt!r}")
    targets = [(name, m) for name, m in lm.named_modules() if type(m) is nn.Linear]
    if any(p.requires_grad for _, m in targets for p in m.parameters()):
        raise ValueError("convert_lm is for a frozen LM; some of its linear weights require grad")
    for name, m in targets:
        if m.weight.device.type != "cpu":
            raise ValueError(f"{name} is on {m.weight.device}; the {fmt} weight format is CPU-only")
    # what to build: (weights, make, place); ``make`` converts, ``place`` swaps the result in. torch's
    # packing runs without the GIL, so the makes run on the intra-op threads side by side, the largest
    # first (the fp16 packing of the default's 135 M weights takes 2.6 s on one core, 1.6 s on two)
    jobs, done = [], set()
    for parent in list(lm.modules()):  # sibling layers with one input: one stacked matrix
        for names in GROUPS:
            ms = [getattr(parent, n, None) for n in names]
            if all(type(m) is nn.Linear for m in ms) and len({m.in_features for m in ms}) == 1:
                done.update(id(m) for m in ms)

                def place(group, parent=parent, names=names, ms=ms):
                    for i, (n, m) in enumerate(zip(names, ms)):
                        setattr(parent, n, _Part(group, i, m.in_features))

                jobs.append((sum(m.weight.numel() for m in ms),
                             lambda ms=ms: Fused(fmt, [m.weight for m in ms], [m.bias for m in ms]), place))
    for name, m in targets:
        if id(m) not in done:
            parent_name, _, child = name.rpartition(".")
            parent = lm.get_submodule(parent_name) if parent_name else lm
            jobs.append((m.weight.numel(), lambda m=m: CLASSES[fmt](m.weight, m.bias),
                         lambda new, parent=parent, child=child: setattr(parent, child, new)))
    jobs.sort(key=lambda job: -job[0])
    with ThreadPoolExecutor(max(1, min(torch.get_num_threads(), 8))) as pool:
        built = list(pool.map(lambda job: job[1](), jobs))  # an error is raised here, before anything is placed
    for (_, _, place), new in zip(jobs, built):
        place(new)
    lm.vc_weight_format = fmt
    return len(targets)


def lm_format(lm: nn.Module) -> str:
    """The weight format :func:`convert_lm` left on ``lm`` (``fp32`` when never converted)."""
    return getattr(lm, "vc_weight_format", "fp32")


def apply(lm: nn.Module, requested: str | None, device: str | torch.device = "cpu") -> tuple[str, str | None]:
    """What ``VisualChat.from_pretrained(lm_weights=...)`` does: resolve ``requested`` for ``device``
    (``None`` = leave the LM as loaded), convert the LM, return ``(format, note)``. An LM that was
    converted already (shared by a second checkpoint) is left in its format. An LM whose linear layers
    are of other kinds (LoRA adapters wrap them; bitsandbytes replaces them) stays as loaded."""
    if requested is None:
        return lm_format(lm), None
    current = lm_format(lm)
    if current != "fp32":
        return current, (None if normalize(requested) in ("auto", current) else
                         f"the LM is shared and already in {current}")
    other = sorted({type(m).__name__ for m in lm.modules()
                    if (isinstance(m, nn.Linear) and type(m) is not nn.Linear) or hasattr(m, "base_layer")})
    if other:
        note = f"the LM's linear layers are {', '.join(other)} (LoRA or bitsandbytes): its weights stay as loaded"
        log.warning("LM weights: %s", note)
        return "fp32", note
    fmt, note = resolve(requested, device)
    convert_lm(lm, fmt)
    if note:
        log.warning("LM weights: %s", note)
    log.info("LM linear weights in %s", fmt)
    return fmt, note
