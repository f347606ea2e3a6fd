"""CLIP ViT encoder (transformers' ``CLIPVisionModel``), LLaVA-style: the patch tokens of the
penultimate layer, without the CLS token."""
from __future__ import annotations

import torch

from .base import VisionEncoder

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPEncoder(VisionEncoder):
    """Frozen CLIP vision tower: ``[n, 3, S, S] -> [n, (S / patch)^2, hidden]``."""

    name = "clip"
    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(self, model, path: str | None = None):
        """``model``: a ``transformers.CLIPVisionModel``; ``path``: where it was loaded from."""
        super().__init__()
        cfg = model.config
        self.model = model
        self.path = path
        self.image_size = cfg.image_size
        self.num_tokens = (cfg.image_size // cfg.patch_size) ** 2
        self.hidden_size = cfg.hidden_size
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, path: str, **kw) -> "CLIPEncoder":
        """A local directory or a hub id. A concrete model class never runs remote code."""
        from transformers import CLIPVisionModel

        return cls(CLIPVisionModel.from_pretrained(path, **kw), path=str(path))

    @classmethod
    def from_config(cls, config) -> "CLIPEncoder":
        """Random weights from a ``transformers.CLIPVisionConfig`` (for tests)."""
        from transformers import CLIPVisionModel

        return cls(CLIPVisionModel(config))

    def spec(self) -> str:
        if self.path is None:
            raise ValueError("this CLIP encoder was built from a config, not a path: save_pretrained it first")
        return f"clip:{self.path}"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, K, d_vis]"""
        out = self.model(pixel_values=pixel_values, output_hidden_states=True)
        return out.hidden_states[-2][:, 1:]  # penultimate layer [n, 1 + K, d] -> drop CLS

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)
