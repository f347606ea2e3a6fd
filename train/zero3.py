"""ZeRO-3 for the frozen vision encoder: built partitioned from the start, run before DeepSpeed's engine.

The LM is built partitioned through transformers' ZeRO-3 path (``train.trainer.partitioned_load``).
A large encoder (Qwen-VL's ViT-bigG and resampler: 1.9 B parameters, 7.2 GiB in fp32) is built the
same way here: its modules are created inside ``deepspeed.zero.Init`` with the run's DeepSpeed config
and precision, so each parameter is split over the ranks as soon as its module exists, and rank 0
then copies the checkpoint's tensors in one parameter at a time (read from the safetensors file,
gathered, written, partitioned again). No rank ever holds more than its share plus one tensor.

Before DeepSpeed's engine exists (it installs its own hooks), a partitioned encoder cannot run by
itself, and every forward is collective: :func:`gathered_forward` gathers each module's parameters
just for its own forward, and :func:`train.features.fill_in_lockstep` fills the image-feature cache with every rank
running the same number of forwards (a rank with nothing left encodes a blank image).
:func:`state_items` gives the encoder's whole tensors one at a time (for the feature cache's key).

Small encoders (EfficientNet-Lite0, CLIP) are loaded whole as before; DeepSpeed partitions them when
the engine starts.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator

import torch
from torch import nn

log = logging.getLogger("train.zero3")

#: encoder kinds (the part of ``--vision`` before ':') that ZeRO-3 builds partitioned
PARTITIONED_ENCODERS = ("qwen-vl",)


def encoder_partitioned(spec: str) -> bool:
    """Whether ZeRO-3 builds the encoder ``spec`` partitioned (the memory planner asks this too)."""
    kind, _, arg = spec.partition(":")
    return kind in PARTITIONED_ENCODERS


def is_partitioned(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a ZeRO-3 parameter."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def build_encoder(spec: str, device: torch.device, ds_config: dict | None = None,
                  dtype: torch.dtype = torch.float32):
    """The frozen encoder for ``spec``: partitioned under ``deepspeed.zero.Init`` (``ds_config``, in
    ``dtype``) when a ZeRO-3 config is given and the encoder is a large one, else whole on ``device``
    (fp32, as before)."""
    from visualchat.encoders import build_encoder as build_whole

    kind, _, arg = spec.partition(":")
    if ds_config is None or not encoder_partitioned(spec) or not arg:
        return build_whole(spec).to(device)
    if kind == "qwen-vl":
        return partitioned_qwen_vl(arg, ds_config, dtype)
    raise ValueError(f"no partitioned loader for --vision {spec!r}")  # PARTITIONED_ENCODERS lists only ours


def partitioned_qwen_vl(path: str, ds_config: dict, dtype: torch.dtype):
    """Qwen-VL's encoder from the safetensors files at ``path``, built partitioned in ``dtype``.

    Every rank reads the files' headers (keys and shapes are checked on every rank, before anything
    collective, so a wrong checkpoint stops all ranks with the same message); only rank 0 reads the
    tensors. Buffers (the resampler's fixed positions) are small and read by every rank."""
    import deepspeed
    from safetensors import safe_open

    from visualchat.encoders.qwen_vl import PREFIX, QwenVLEncoder, check_keys, checkpoint_config, checkpoint_files

    files = checkpoint_files(path)
    config = checkpoint_config(path)
    where: dict[str, tuple[str, list[int]]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                if k.startswith(PREFIX):
                    where[k[len(PREFIX):]] = (f, list(st.get_slice(k).get_shape()))
    # the precision comes from the config (DeepSpeed 0.19's zero.Init ignores an explicit dtype on a
    # device without fp16 support and picks bf16), checked below
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        enc = QwenVLEncoder(config, path=str(path))
    for mod in enc.modules():  # buffers are not partitioned: in the run's precision, like the whole encoder's
        for bn, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point():
                mod._buffers[bn] = b.to(dtype)
    params, buffers = dict(enc.named_parameters()), dict(enc.named_buffers())
    got = {p.dtype for p in params.values()}
    if got != {dtype}:
        raise ValueError(f"the partitioned Qwen-VL encoder came out in {sorted(map(str, got))}, not {dtype}: "
                         "the DeepSpeed config's bf16/fp16 settings must match --precision")
    full = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
    full.update({n: list(b.shape) for n, b in buffers.items()})
    check_keys(set(full), set(where), path, config)
    wrong = [f"{n}: {where[n][1]} in the file, {s} in the model" for n, s in full.items() if where[n][1] != s]
    if wrong:
        raise ValueError(f"{path} is not a Qwen-VL checkpoint matching {config}: shapes differ: {wrong[:4]}")
    rank0 = _rank() == 0
    handles: dict[str, Any] = {}
    try:
        def tensor(name: str) -> torch.Tensor:
            f = where[name][0]
            if f not in handles:
                handles[f] = safe_open(f, framework="pt")
            return handles[f].get_tensor(PREFIX + name)

        with torch.no_grad():
            for name, p in params.items():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if rank0:
                        p.data.copy_(tensor(name))
            for name, b in buffers.items():
                b.copy_(tensor(name))
    finally:
        handles.clear()
    _mark_leaf_modules(enc)
    return enc.requires_grad_(False).eval()


#: modules whose forward reads their children's parameters without calling the children (so ZeRO-3
#: must gather the whole module at once)
LEAF_TYPES = (nn.MultiheadAttention,)


def _mark_leaf_modules(module: nn.Module) -> None:
    """Tell DeepSpeed's engine to gather :data:`LEAF_TYPES` whole (``nn.MultiheadAttention`` reads
    ``out_proj.weight`` without calling ``out_proj``)."""
    from deepspeed.utils import set_z3_leaf_modules

    if any(isinstance(m, LEAF_TYPES) for m in module.modules()):
        set_z3_leaf_modules(module, list(LEAF_TYPES))


def _units(module: nn.Module) -> Iterator[tuple[nn.Module, list]]:
    """(module, the ZeRO-3 parameters its forward needs gathered) for every module that has any."""
    inside_leaf: set[int] = set()
    for m in module.modules():
        if id(m) in inside_leaf:
            continue
        if isinstance(m, LEAF_TYPES):
            inside_leaf.update(id(s) for s in m.modules())
            params = list(m.parameters())
        else:
            params = list(m.parameters(recurse=False))
        params = [p for p in params if hasattr(p, "ds_id")]
        if params:
            yield m, params


@contextlib.contextmanager
def gathered_forward(module: nn.Module):
    """While inside, ``module(...)`` runs with its ZeRO-3 parameters gathered one module at a time
    (each module's own parameters for its own forward, released after it). Collective: every rank
    must run the same forwards. A no-op for a module with no ZeRO-3 parameters."""
    if not is_partitioned(module):
        yield
        return
    import deepspeed

    open_: dict[int, list] = {}
    handles = []

    def pre(mod, args, _params=None):
        ctx = deepspeed.zero.GatheredParameters(_params)
        ctx.__enter__()
        open_.setdefault(id(mod), []).append(ctx)

    def post(mod, args, out):
        stack = open_.get(id(mod))
        if stack:
            stack.pop().__exit__(None, None, None)

    for m, params in _units(module):
        handles.append(m.register_forward_pre_hook(lambda mod, args, _p=params: pre(mod, args, _p)))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def state_items(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``sorted(module.state_dict().items())`` with each ZeRO-3 parameter whole (gathered one at a
    time, collective: every rank must consume the whole iterator)."""
    sd = module.state_dict()
    params = dict(module.named_parameters())
    if not any(hasattr(p, "ds_id") for p in params.values()):
        yield from sorted(sd.items())
        return
    import deepspeed

    for name, t in sorted(sd.items()):
        p = params.get(name)
        if p is not None and hasattr(p, "ds_id"):
            with deepspeed.zero.GatheredParameters([p]):
                yield name, p.detach()
        else:
            yield name, t
