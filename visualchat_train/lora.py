"""LoRA adapters through peft, injected in place (``peft.inject_adapter_in_model``) so the model keeps
its own classes and ``VisualChatModel`` runs unchanged.

A checkpoint stores only the adapter weights, as ``lora.<parameter name>`` in
``trainable.safetensors``, and ``config.lora = {"lm": LoraConfig kwargs, "vision": LoraConfig kwargs}``
(either may be missing). :func:`visualchat.lora.load_lora` applies them when ``VisualChat.from_pretrained`` loads such a
checkpoint.
"""
from __future__ import annotations

from typing import Any

import torch

from visualchat.lora import inject

from .config import TrainConfig


def lora_kwargs(rank: int, alpha: float | None, targets: str | list[str], dropout: float = 0.0,
                layers: list[int] | None = None) -> dict[str, Any]:
    """peft ``LoraConfig`` kwargs; ``layers``: only these decoder layers get adapters (all when None)."""
    if isinstance(targets, str):
        targets = "all-linear" if targets.strip() == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    kw = {"r": int(rank), "lora_alpha": float(alpha if alpha is not None else 2 * rank),
          "target_modules": targets, "lora_dropout": float(dropout), "bias": "none"}
    if layers is not None:
        kw.update(layers_to_transform=list(layers), layers_pattern="layers")
    return kw


def top_layers(lm, n: int) -> list[int] | None:
    """The indices of the LM's top ``n`` decoder layers (None: ``n`` is 0, every layer)."""
    if not n:
        return None
    total = lm.config.num_hidden_layers
    if not 0 < n <= total:
        raise ValueError(f"--lora_layers {n}: the LM has {total} decoder layers")
    return list(range(total - n, total))


def apply_lora(vcm, cfg: TrainConfig) -> dict[str, Any]:
    """Inject the adapters ``cfg`` asks for into ``vcm.lm`` / ``vcm.encoder``; returns config.lora."""
    lora: dict[str, Any] = {}
    if cfg.lora_rank > 0:
        lora["lm"] = lora_kwargs(cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout,
                                 top_layers(vcm.lm, cfg.lora_layers))
        inject(vcm.lm, lora["lm"])
    if cfg.vision_lora_rank > 0:
        lora["vision"] = lora_kwargs(cfg.vision_lora_rank, cfg.vision_lora_alpha, cfg.vision_lora_target_modules,
                                     cfg.lora_dropout)
        inject(vcm.encoder, lora["vision"])
    return lora


def qlora_unsupported_reason() -> str | None:
    """None when bitsandbytes can run a 4-bit (nf4) linear layer forward and backward here, else why not."""
    try:
        import bitsandbytes as bnb
    except Exception as e:  # not installed, or no backend for this platform
        return f"bitsandbytes is not usable ({type(e).__name__}: {e})"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        lin = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(torch.randn(64, 64), requires_grad=False, quant_type="nf4")
        lin = lin.to(dev)
        x = torch.randn(2, 64, device=dev, requires_grad=True)
        lin(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            return "bitsandbytes' 4-bit layer gave no usable gradient"
    except Exception as e:
        return f"bitsandbytes has no working 4-bit backend on {dev} ({type(e).__name__}: {str(e)[:200]})"
    return None
