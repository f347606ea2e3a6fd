"""Export the trainable parts in the app's checkpoint format (``visualchat.checkpoint.save_checkpoint``),
gathered from all ranks under ZeRO-3 (``deepspeed.zero.GatheredParameters``) and taken from the
optimiser's fp32 master copy when training in bf16/fp16."""
from __future__ import annotations

import contextlib

import torch

from visualchat.checkpoint import save_checkpoint

from . import dist as D
from visualchat.lora import lora_parameters


def _full_fp32(p: torch.Tensor) -> torch.Tensor:
    """The fp32 master copy of ``p`` when DeepSpeed keeps one, else ``p`` itself (as float32)."""
    if p.dtype != torch.float32:
        try:
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(p)
            if full is not None:
                return full.detach().float().cpu()
        except Exception:
            pass
    return p.detach().float().cpu()


def export_checkpoint(vcm, path: str, config, zero3: bool = False, rank: int = 0, engine=None) -> None:
    """Collective under ZeRO-3 (every rank must call it); rank 0 writes ``path``. ``engine``: the
    DeepSpeed engine under ZeRO-3, whose parameters still in flight (prefetched for a next forward,
    e.g. after an evaluation) are waited for and released first: gathering one of them would fail."""
    if zero3 and engine is not None and hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()
    lora = lora_parameters(vcm)
    proj_params = dict(vcm.projection.named_parameters())
    params = list(proj_params.values()) + [vcm.embed_tokens.weight, vcm.base_embedding] + list(lora.values())
    if zero3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        proj = {vcm.projection.checkpoint_key(k): _full_fp32(p) for k, p in proj_params.items()}
        emb = _full_fp32(vcm.embed_tokens.weight)
        extra = {"lora." + k: _full_fp32(p) for k, p in lora.items()}
        if rank == 0:
            save_checkpoint(vcm, path, config, extra=extra, embed_weight=emb, projection=proj)
    D.barrier()
