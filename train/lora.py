"""LoRA adapters through peft, injected in place (``peft.inject_adapter_in_model``) so the model keeps
its own classes and ``VisualChatModel`` runs unchanged.

A checkpoint stores only the adapter weights, as ``lora.<parameter name>`` in
``trainable.safetensors``, and ``config.lora = {"lm": LoraConfig kwargs, "vision": LoraConfig kwargs}``
(either may be missing). :func:`load_lora` applies them to a loaded model, and
:func:`from_pretrained` is ``VisualChat.from_pretrained`` plus that.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

PREFIX = "lora."


def lora_kwargs(rank: int, alpha: float | None, targets: str | list[str], dropout: float = 0.0) -> dict[str, Any]:
    if isinstance(targets, str):
        targets = "all-linear" if targets.strip() == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return {"r": int(rank), "lora_alpha": float(alpha if alpha is not None else 2 * rank),
            "target_modules": targets, "lora_dropout": float(dropout), "bias": "none"}


def inject(module: nn.Module, kwargs: dict[str, Any]) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    kw = dict(kwargs)
    if kw.get("target_modules") == "all-linear":
        kw["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules()
                                       if isinstance(m, nn.Linear) and not n.endswith("lm_head")})
    try:
        inject_adapter_in_model(LoraConfig(**kw), module)
    except ValueError as e:
        raise ValueError(f"LoRA target modules {kw['target_modules']} not found in {type(module).__name__}: {e}") from None
    for n, p in module.named_parameters():  # only the adapters train
        p.requires_grad_("lora_" in n)


def apply_lora(vcm, args) -> dict[str, Any]:
    """Inject the adapters the flags ask for into ``vcm.lm`` / ``vcm.encoder``; returns config.lora."""
    cfg: dict[str, Any] = {}
    if args.lora_rank > 0:
        cfg["lm"] = lora_kwargs(args.lora_rank, args.lora_alpha, args.lora_target_modules, args.lora_dropout)
        inject(vcm.lm, cfg["lm"])
    if args.vision_lora_rank > 0:
        cfg["vision"] = lora_kwargs(args.vision_lora_rank, args.vision_lora_alpha, args.vision_lora_target_modules,
                                    args.lora_dropout)
        inject(vcm.encoder, cfg["vision"])
    return cfg


def lora_parameters(vcm) -> dict[str, nn.Parameter]:
    """name (relative to the VisualChatModel) -> LoRA parameter."""
    return {n: p for n, p in vcm.named_parameters() if "lora_" in n}


@torch.no_grad()
def load_lora(vcm, lora_config: dict[str, Any] | None, tensors: dict[str, torch.Tensor]) -> int:
    """Inject the adapters of ``lora_config`` and load their weights from ``tensors`` (keys with the
    ``lora.`` prefix; others are ignored). Returns how many tensors were loaded."""
    if not lora_config:
        return 0
    if "lm" in lora_config:
        inject(vcm.lm, lora_config["lm"])
    if "vision" in lora_config:
        inject(vcm.encoder, lora_config["vision"])
    params = lora_parameters(vcm)
    got = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    missing = sorted(set(params) - set(got))
    unexpected = sorted(set(got) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not match the model: missing {missing[:3]}..., unexpected {unexpected[:3]}...")
    for k, p in params.items():
        p.copy_(got[k].to(p.device, p.dtype))
        p.requires_grad_(False)
    return len(params)


def from_pretrained(path: str | None = None, **kw):
    """``VisualChat.from_pretrained`` that also applies the checkpoint's LoRA adapters, if any."""
    from visualchat.checkpoint import load_tensors
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(path, **kw)
    if path is not None and vc.config.lora:
        load_lora(vc.model, vc.config.lora, load_tensors(path))
    return vc


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
