"""Saves and loads the trainable parts (projection, embedding as changed rows) and checks them
against the base model.

A checkpoint is a directory: ``config.json`` (see :mod:`visualchat.config`) and
``trainable.safetensors`` with

- the projection's tensors under ``projection.`` (a linear one: ``projection.weight`` ``[H, d_vis]``
  and ``projection.bias`` ``[H]``; other kinds: see :mod:`visualchat.projection`);
- either ``embed_tokens.rows`` ``[n, H]`` with ``embed_tokens.index`` ``[n]`` (int64): the rows that
  differ from the base LM's input embedding (sparse store), or ``embed_tokens.weight`` ``[V, H]``
  when more than half the rows changed (dense store);
- optional LoRA adapter tensors under ``lora.`` (see the trainer).
A checkpoint larger than :data:`SHARD_BYTES` is written in shards of at most that size instead
(``trainable-00001-of-0000N.safetensors`` ..., with ``trainable.safetensors.index.json`` mapping every
tensor to its file, as transformers does), so that every file stays under the size limit of the
Hugging Face Hub without git-lfs; loading reads either form. Only safetensors is ever read. Loading checks every tensor's name, dtype, exact shape (nothing is
broadcast), finiteness and, for embedding indices, range and uniqueness; messages name the file.
"""
from __future__ import annotations

import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .config import VisualChatConfig
from .projection import same_tensors

WEIGHTS_NAME = "trainable.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SHARD_BYTES = 10 * 1000 * 1000  # the largest file a checkpoint writes (10 MB)
DENSE_FRACTION = 0.5


class CheckpointMismatch(ValueError):
    """The checkpoint was trained for another base model or encoder."""


def embedding_tensors(weight: torch.Tensor, base: torch.Tensor) -> dict[str, torch.Tensor]:
    """The sparse (changed rows + indices) or dense store of a trained embedding."""
    weight = weight.detach().cpu()
    base = base.detach().cpu()
    # compare at the lower of the two precisions: a float32 copy of a base that now runs in bf16
    # differs from it in every row by rounding alone, not by training
    low = base.dtype if torch.finfo(base.dtype).bits < torch.finfo(weight.dtype).bits else weight.dtype
    changed = (weight.to(low) != base.to(low)).any(dim=1).nonzero().flatten()
    if changed.numel() > DENSE_FRACTION * weight.shape[0]:
        return {"embed_tokens.weight": weight.contiguous()}
    return {"embed_tokens.rows": weight[changed].contiguous(), "embed_tokens.index": changed.to(torch.int64)}


def save_checkpoint(model, path: str, config: VisualChatConfig, extra: dict[str, torch.Tensor] | None = None,
                    embed_weight: torch.Tensor | None = None, projection: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``path/config.json`` and ``path/trainable.safetensors`` atomically (temp file, rename).
    ``embed_weight``/``projection`` override the model's own tensors (the trainer passes gathered
    ZeRO-3 copies)."""
    os.makedirs(path, exist_ok=True)
    emb = embed_weight if embed_weight is not None else model.embed_tokens.weight
    proj = projection or model.projection.checkpoint_tensors()
    tensors = {k: v.detach().cpu().contiguous() for k, v in proj.items()}
    tensors.update(embedding_tensors(emb, model.base_embedding))
    for k, v in (extra or {}).items():
        tensors[k] = v.detach().cpu().contiguous()
    shards = shard(tensors, SHARD_BYTES)
    names = ([WEIGHTS_NAME] if len(shards) == 1
             else [f"trainable-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for old in os.listdir(path):  # a checkpoint saved here before, in the other form or more shards
        if old == INDEX_NAME or (old.startswith("trainable") and old.endswith(".safetensors") and old not in names):
            os.remove(os.path.join(path, old))
    for name, part in zip(names, shards):
        write_atomic(path, name, lambda tmp, part=part: save_file(part, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(_nbytes(v) for v in tensors.values())},
                 "weight_map": {k: name for name, part in zip(names, shards) for k in part}}
        write_atomic(path, INDEX_NAME, lambda tmp: _write_json(tmp, index))
    config.save(path)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def shard(tensors: dict[str, torch.Tensor], limit: int = SHARD_BYTES) -> list[dict[str, torch.Tensor]]:
    """Tensors in name order, cut into groups of at most ``limit`` bytes of data each; a tensor larger
    than ``limit`` alone is split along its first dimension into ``name``, ``name@1``, ... (joined again
    by :func:`load_tensors`). One group when everything fits."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k in sorted(tensors):
        v = tensors[k]
        pieces = [(k, v)]
        if _nbytes(v) > limit and v.dim() >= 1 and v.shape[0] > 1:
            rows = max(1, limit // max(1, _nbytes(v[0])))
            pieces = [(k if i == 0 else f"{k}@{i}", c.contiguous()) for i, c in enumerate(v.split(rows))]
        for name, t in pieces:
            if size + _nbytes(t) > limit and parts[-1]:
                parts.append({})
                size = 0
            parts[-1][name] = t
            size += _nbytes(t)
    return parts


def _write_json(file: str, obj: dict) -> None:
    with open(file, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)


def write_atomic(path: str, name: str, write) -> None:
    """``write(tmp)`` into a temporary file in folder ``path``, then rename it to ``name``: a reader never
    sees a half-written file, and a failed write leaves no temporary behind."""
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, os.path.join(path, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_compatible(model, config: VisualChatConfig, path: str = "checkpoint", any_grid: bool = False) -> None:
    """Raise :class:`CheckpointMismatch` with the numbers when the checkpoint's base differs.
    ``any_grid`` accepts another number of image tokens per image (the same encoder pooled to
    another grid, e.g. ``efficientnet-lite0`` -> ``efficientnet-lite0:head@3``): the projection acts
    on each token alone, so it fits any K; only a training start (``--init_from``) asks for this."""
    vocab, hidden = model.base_embedding.shape
    problems = []
    if config.vocab_size != vocab:
        problems.append(f"vocab size {config.vocab_size} vs the LM's {vocab}")
    if config.lm_hidden_size != hidden:
        problems.append(f"hidden size {config.lm_hidden_size} vs the LM's {hidden}")
    if config.vision_hidden_size != model.encoder.hidden_size:
        problems.append(f"vision dim {config.vision_hidden_size} vs the encoder's {model.encoder.hidden_size}")
    if config.image_tokens != model.image_tokens and not any_grid:
        problems.append(f"{config.image_tokens} image tokens vs the model's {model.image_tokens}")
    if problems:
        raise CheckpointMismatch(
            f"{path} was trained for another base model (LM {config.lm!r}, vision {config.vision!r}): "
            + "; ".join(problems))


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint at ``path``: one ``trainable.safetensors``, or the shards its
    ``trainable.safetensors.index.json`` lists (a tensor split over pieces ``name``, ``name@1``, ... is
    joined again)."""
    index_file = os.path.join(path, INDEX_NAME)
    if not os.path.isfile(index_file):
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in checkpoint {path!r}")
        return load_file(file)
    try:
        weight_map = json.load(open(index_file))["weight_map"]
        files = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointMismatch(f"{index_file} is not a valid shard index: {e}") from None
    pieces: dict[str, torch.Tensor] = {}
    for name in files:
        if os.path.basename(name) != name or not name.endswith(".safetensors"):
            raise CheckpointMismatch(f"{index_file} names {name!r}, which is not a safetensors file beside it")
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint {path!r}: shard {name} listed in {INDEX_NAME} is missing")
        pieces.update(load_file(file))
    if set(pieces) != set(weight_map):
        raise CheckpointMismatch(f"{index_file}: the shards hold other tensors than the index lists")
    out: dict[str, torch.Tensor] = {}
    for k in sorted(k for k in pieces if "@" not in k):
        parts, i = [pieces[k]], 1
        while f"{k}@{i}" in pieces:
            parts.append(pieces[f"{k}@{i}"])
            i += 1
        out[k] = parts[0] if len(parts) == 1 else torch.cat(parts)
    stray = [k for k in pieces if "@" in k and k.split("@")[0] not in out]
    if stray:
        raise CheckpointMismatch(f"{index_file}: pieces without their first part: {stray[:3]}")
    return out


@torch.no_grad()
def load_trainable(model, path: str, config: VisualChatConfig | None = None,
                   any_grid: bool = False) -> dict[str, torch.Tensor]:
    """Check and load a checkpoint's projection and embedding into ``model``; returns the tensors
    it did not consume (e.g. LoRA adapters). ``any_grid``: see :func:`check_compatible`."""
    config = config or VisualChatConfig.load(path)
    check_compatible(model, config, path, any_grid)
    if not same_tensors(config.vis_proj, model.projection.spec):
        raise CheckpointMismatch(f"{path}: the checkpoint's projection is {config.vis_proj!r}, the model was built "
                                 f"with {model.projection.spec!r}")
    t = load_tensors(path)
    where = os.path.join(path, WEIGHTS_NAME)
    emb = model.embed_tokens.weight
    new = model.base_embedding.detach().to(emb.device, emb.dtype).clone()
    if "embed_tokens.weight" in t:
        w = _checked_float(t.pop("embed_tokens.weight"), "embed_tokens.weight", tuple(emb.shape), where)
        new.copy_(w)
    elif "embed_tokens.rows" in t or "embed_tokens.index" in t:
        if "embed_tokens.rows" not in t or "embed_tokens.index" not in t:
            raise CheckpointMismatch(f"{where}: embed_tokens.rows and embed_tokens.index come together; one is missing")
        idx = t.pop("embed_tokens.index")
        if idx.dtype != torch.int64 or idx.dim() != 1:
            raise CheckpointMismatch(f"{where}: embed_tokens.index must be a 1-D int64 tensor, got {idx.dtype} "
                                     f"of shape {tuple(idx.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= emb.shape[0]):
            raise CheckpointMismatch(f"{where}: embed_tokens.index holds rows outside 0..{emb.shape[0] - 1} "
                                     f"(min {int(idx.min())}, max {int(idx.max())})")
        if idx.unique().numel() != idx.numel():
            raise CheckpointMismatch(f"{where}: embed_tokens.index lists a row more than once")
        rows = _checked_float(t.pop("embed_tokens.rows"), "embed_tokens.rows", (idx.numel(), emb.shape[1]), where)
        new[idx.to(new.device)] = rows.to(new.device, new.dtype)
    proj = {k: t.pop(k) for k in [k for k in t if k.startswith("projection.")]}
    need = {k: tuple(v.shape) for k, v in model.projection.checkpoint_tensors().items()}
    missing, unexpected = sorted(set(need) - set(proj)), sorted(set(proj) - set(need))
    if missing or unexpected:
        raise CheckpointMismatch(f"{where}: the {model.projection.spec!r} projection needs {sorted(need)}; "
                                 + "; ".join(([f"missing {missing}"] if missing else [])
                                             + ([f"unexpected {unexpected}"] if unexpected else [])))
    for name, x in proj.items():
        _checked_float(x, name, need[name], where)
    model.projection.load_checkpoint_tensors(proj)  # only now: a bad file leaves the model as it was
    emb.copy_(new)
    return t


def _checked_float(x: torch.Tensor, name: str, shape: tuple, where: str) -> torch.Tensor:
    if tuple(x.shape) != shape:
        raise CheckpointMismatch(f"{where}: {name} has shape {tuple(x.shape)}, the model needs {shape}")
    if not x.is_floating_point():
        raise CheckpointMismatch(f"{where}: {name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise CheckpointMismatch(f"{where}: {name} holds NaN or infinite values")
    return x
