"""Vision encoders: PIL images in, ``[n, K, d_vis]`` out. ``build_encoder(spec)`` makes one from the
string stored in checkpoints (``encoder.spec()``)."""
from __future__ import annotations

from .base import VisionEncoder

SPECS = (
    '"efficientnet-lite0" (or "default")',
    '"efficientnet-lite0:<taps>[@<grid>]" (e.g. "efficientnet-lite0:stage5+head+pos" or "efficientnet-lite0:head@3")',
    '"clip:<local path or hub id>"',
    '"qwen-vl:<directory of a Qwen-VL safetensors checkpoint>"',
)


def build_encoder(spec: str, **kw) -> VisionEncoder:
    """``spec`` -> a frozen encoder; ``kw`` goes to the encoder's loader."""
    kind, _, arg = spec.partition(":")
    if spec in ("efficientnet-lite0", "default"):
        from .efficientnet import EfficientNetLite0

        return EfficientNetLite0(**kw)
    if kind == "efficientnet-lite0" and arg:
        from .efficientnet import EfficientNetLite0, parse_taps

        taps, grid = parse_taps(arg)
        return EfficientNetLite0(taps=taps, grid=grid, **kw)
    if kind == "clip" and arg:
        from .clip import CLIPEncoder

        return CLIPEncoder.from_pretrained(arg, **kw)
    if kind == "qwen-vl" and arg:
        from .qwen_vl import QwenVLEncoder

        return QwenVLEncoder.from_checkpoint(arg, **kw)
    raise ValueError(f"unknown vision encoder spec {spec!r}; valid forms: " + ", ".join(SPECS))


__all__ = ["VisionEncoder", "build_encoder"]
