"""Applies the LoRA adapters a checkpoint stores (``lora.<parameter>`` tensors, ``config.lora``)
through peft, injected in place so the model keeps its own classes."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

PREFIX = "lora."


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
    n = copy_lora(vcm, tensors)
    for p in lora_parameters(vcm).values():
        p.requires_grad_(False)
    return n


@torch.no_grad()
def copy_lora(vcm, tensors: dict[str, torch.Tensor]) -> int:
    """Copy the ``lora.``-prefixed ``tensors`` into the adapters already injected in ``vcm``, which must
    match them one to one in names and shapes (ValueError naming the first differences, before anything
    is copied). Returns how many tensors were copied."""
    params = lora_parameters(vcm)
    got = {k[len(PREFIX):]: v for k, v in tensors.items() if k.startswith(PREFIX)}
    missing = sorted(set(params) - set(got))
    unexpected = sorted(set(got) - set(params))
    if missing or unexpected:
        raise ValueError(f"LoRA weights do not match the model: missing {missing[:3]}..., unexpected {unexpected[:3]}...")
    shapes = [k for k, p in params.items() if tuple(got[k].shape) != tuple(p.shape)]
    if shapes:
        k = shapes[0]
        raise ValueError(f"LoRA weight {k} has shape {tuple(got[k].shape)}, the model's {tuple(params[k].shape)} "
                         f"({len(shapes)} differ; another rank?)")
    for k, p in params.items():
        p.copy_(got[k].to(p.device, p.dtype))
    return len(params)


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter under ``module`` into its base layer's weight and put the plain base
    layer (``nn.Linear``, a conv) back in its place, so the model serves with its own classes and
    every inference path that rewrites plain linear layers (low-precision weights, fused projections,
    the lean decode step) applies to it. For inference only: the trainer keeps the adapters apart.
    Returns how many layers were merged."""
    wrapped = [(n, m) for n, m in module.named_modules() if hasattr(m, "base_layer") and hasattr(m, "merge")]
    for name, m in wrapped:
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, m.get_base_layer())
    return len(wrapped)


