"""ZeRO-3 for the LM and the frozen vision encoder: built partitioned from the start, filled tensor by
tensor from safetensors files; the encoder run before DeepSpeed's engine.

The LM (:func:`partitioned_lm`) is created from its config inside ``deepspeed.zero.Init`` (the run's
DeepSpeed config, so in its precision) and rank 0 copies the checkpoint in one parameter at a time
(:func:`fill_partitioned`): no rank ever holds the merged state dict that transformers' own ZeRO-3
loader builds on rank 0. Where that path does not apply (a hub id, ``.bin`` or GGUF weights, remote
code, a pre-quantized checkpoint) the LM goes through transformers' ZeRO-3 path instead
(``visualchat_train.model.partitioned_load``).
A large encoder (Qwen-VL's ViT-bigG and resampler: 1.9 B parameters, 7.2 GiB in fp32) is built the
same way here: its modules are created inside ``deepspeed.zero.Init`` with the run's DeepSpeed config
and precision, so each parameter is split over the ranks as soon as its module exists, and rank 0
then copies the checkpoint's tensors in one parameter at a time (read from the safetensors file,
gathered, written, partitioned again). No rank ever holds more than its share plus one tensor.

Before DeepSpeed's engine exists (it installs its own hooks), a partitioned encoder cannot run by
itself, and every forward is collective: :func:`gathered_forward` gathers each module's parameters
just for its own forward, and :func:`visualchat_train.features.fill_in_lockstep` fills the image-feature cache with every rank
running the same number of forwards (a rank with nothing left encodes a blank image).
:func:`state_items` gives the encoder's whole tensors one at a time (for the feature cache's key).

Small encoders (EfficientNet-Lite0, CLIP) are loaded whole as before; DeepSpeed partitions them when
the engine starts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Iterator

import torch
from torch import nn

log = logging.getLogger("visualchat_train.zero3")

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

    from visualchat.encoders.qwen_vl import PREFIX, QwenVLEncoder, check_keys, checkpoint_config, checkpoint_files

    files = checkpoint_files(path)
    config = checkpoint_config(path)
    where = safetensors_index(files, PREFIX)
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
    check_keys(set(params) | set(buffers), set(where), path, config)
    fill_partitioned(params, buffers, where, f"{path} (a Qwen-VL checkpoint matching {config})")
    _mark_leaf_modules(enc)
    return enc.requires_grad_(False).eval()


def safetensors_index(files: list[str], prefix: str = "") -> dict[str, tuple[str, str, list[int]]]:
    """{name without ``prefix``: (file, key in the file, shape)} for every tensor of ``files`` whose key
    starts with ``prefix``, read from the files' headers only."""
    from safetensors import safe_open

    where: dict[str, tuple[str, str, list[int]]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for k in st.keys():
                if k.startswith(prefix):
                    where[k[len(prefix):]] = (f, k, list(st.get_slice(k).get_shape()))
    return where


def fill_partitioned(params: dict[str, nn.Parameter], buffers: dict[str, torch.Tensor],
                     where: dict[str, tuple[str, str, list[int]]], what: str) -> None:
    """Copy the checkpoint's tensors into a model built under ``deepspeed.zero.Init``, one parameter at
    a time: each ZeRO-3 parameter is gathered, rank 0 reads its tensor (a ``safe_open`` of its file
    for that one tensor, so at most one tensor of the checkpoint is resident) and writes it, and the
    parameter is partitioned again (DeepSpeed broadcasts rank 0's values). Buffers are small and read
    by every rank. Every name of ``params`` and ``buffers`` must be in ``where`` with the same shape
    (checked on every rank before anything collective, so a wrong checkpoint stops all ranks with the
    same message); the copy casts to the parameter's dtype. Collective: every rank calls it."""
    import deepspeed
    from safetensors import safe_open

    full = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in params.items()}
    full.update({n: list(b.shape) for n, b in buffers.items()})
    missing = sorted(n for n in full if n not in where)
    if missing:
        raise ValueError(f"{what}: {len(missing)} tensors are missing from the checkpoint: {missing[:8]}")
    wrong = [f"{n}: {where[n][2]} in the file, {s} in the model" for n, s in full.items() if where[n][2] != s]
    if wrong:
        raise ValueError(f"{what}: shapes differ for {len(wrong)} tensors: {wrong[:4]}")

    def tensor(name: str) -> torch.Tensor:
        f, key, _ = where[name]
        with safe_open(f, framework="pt") as st:
            return st.get_tensor(key)

    rank0 = _rank() == 0
    with torch.no_grad():
        for name, p in params.items():
            if not hasattr(p, "ds_id"):  # not partitioned (built outside zero.Init): every rank reads it
                p.data.copy_(tensor(name))
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank0:
                    p.data.copy_(tensor(name))
        for name, b in buffers.items():
            b.copy_(tensor(name))


def lm_checkpoint_files(path: str) -> list[str] | None:
    """The safetensors files of a local HF checkpoint folder (``model.safetensors`` or the shards that
    ``model.safetensors.index.json`` names), or None where the folder has no safetensors weights (a
    hub id, ``.bin`` weights, a GGUF file): those go through transformers' loader."""
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
        return None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index} is not a safetensors index (a 'weight_map' of key -> file): {e}") from None
        files = [os.path.join(path, n) for n in names]
        absent = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if absent:
            raise ValueError(f"{index} names shards that are not in {path}: {absent[:4]}")
        return files
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else None


def local_lm_folder(spec: str) -> str:
    """``spec`` itself when it is a local folder, else the hub cache's snapshot of the repository
    ``spec`` when one is there (``huggingface-cli download <id>`` puts it there), else ``spec``."""
    if os.path.isdir(spec) or spec.count("/") != 1:
        return spec
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(spec, local_files_only=True)
    except Exception:  # not in the cache (or not a repo id): transformers' loader downloads it
        return spec
    try:
        lm_checkpoint_files(folder)
    except ValueError:  # an incomplete snapshot: let transformers' loader fetch what is missing
        return spec
    return folder


def partitioned_lm(path: str, ds_config: dict, dtype: torch.dtype, trust_remote_code: bool = False):
    """The causal LM at ``path`` (a folder, or a hub id already in the hub cache: :func:`local_lm_folder`)
    built partitioned under ZeRO-3 in ``dtype`` and filled tensor by tensor
    from its safetensors files (:func:`fill_partitioned`), or None where this path does not apply (no
    local safetensors weights, remote code whose names we cannot vouch for, a pre-quantized
    checkpoint, a transformers without the helpers used here): the caller then uses transformers'
    ZeRO-3 loader, which reads the whole checkpoint into one state dict on rank 0.

    The model is created from its config with weight initialisation off (every weight is then
    copied in) and RoPE's ``arange`` kept out of zero.Init's dtype cast, as transformers does for its
    own ZeRO-3 path. Tied weights (``tie_word_embeddings``: ``lm_head.weight`` is the embedding) are
    read once; a checkpoint that stores the tied copy too is fine, one that stores only the tied copy
    fills the embedding from it. A checkpoint's tensors that the model lacks, or the model's that the
    checkpoint lacks, stop the load with their names (transformers would warn and initialise missing
    ones randomly)."""
    path = local_lm_folder(path)
    files = lm_checkpoint_files(path)
    if files is None or trust_remote_code:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None):
        return None
    try:
        from transformers.initialization import no_init_weights
        from transformers.integrations.deepspeed import prevent_arange_dtype_change
    except ImportError as e:  # another transformers: its own ZeRO-3 loader still works
        log.warning("tensor-by-tensor ZeRO-3 load unavailable (%s); using transformers' loader", e)
        return None
    import deepspeed

    where = safetensors_index(files)
    # the precision comes from the DeepSpeed config (zero.Init casts to its bf16/fp16), checked below
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype)
        lm.tie_weights()
    params = dict(lm.named_parameters())
    by_id = {id(p): n for n, p in params.items()}
    persistent = lm.state_dict(keep_vars=True)
    buffers = {n: b for n, b in lm.named_buffers() if n in persistent}
    aliases = {n: by_id[id(t)] for n, t in persistent.items() if n not in params and n not in buffers}
    for alias, canonical in aliases.items():  # a tied weight stored under its other name only
        if canonical not in where and alias in where:
            where[canonical] = where[alias]
    ignore = [re.compile(r) for r in (getattr(lm, "_keys_to_ignore_on_load_unexpected", None) or [])]
    unexpected = sorted(k for k in where if k not in params and k not in buffers and k not in aliases
                        and not any(r.search(k) for r in ignore))
    what = f"{path} ({type(lm).__name__})"
    if unexpected:
        raise ValueError(f"{what}: the checkpoint has {len(unexpected)} tensors the model does not: {unexpected[:8]} "
                         "(its names differ from this transformers' model; tensor names must match exactly)")
    got = {p.dtype for p in params.values()}
    if got != {dtype}:
        raise ValueError(f"the partitioned LM came out in {sorted(map(str, got))}, not {dtype}: "
                         "the DeepSpeed config's bf16/fp16 settings must match --precision")
    fill_partitioned(params, buffers, where, what)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        lm.generation_config = GenerationConfig.from_pretrained(path)
    return lm.eval()


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
