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
Only safetensors is ever read. Loading checks every tensor's name, dtype, exact shape (nothing is
broadcast), finiteness and, for embedding indices, range and uniqueness; messages name the file.
"""
from __future__ import annotations

import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .config import VisualChatConfig

WEIGHTS_NAME = "trainable.safetensors"
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
    fd, tmp = tempfile.mkstemp(dir=path, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, WEIGHTS_NAME))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    config.save(path)


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
    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in checkpoint {path!r}")
    return load_file(file)


@torch.no_grad()
def load_trainable(model, path: str, config: VisualChatConfig | None = None,
                   any_grid: bool = False) -> dict[str, torch.Tensor]:
    """Check and load a checkpoint's projection and embedding into ``model``; returns the tensors
    it did not consume (e.g. LoRA adapters). ``any_grid``: see :func:`check_compatible`."""
    config = config or VisualChatConfig.load(path)
    check_compatible(model, config, path, any_grid)
    if config.vis_proj != model.projection.spec:
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
