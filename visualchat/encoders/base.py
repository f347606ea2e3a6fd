"""The one small interface every vision encoder implements: PIL images in, ``[n, K, d_vis]`` out."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn


class VisionEncoder(nn.Module):
    """Base class. Subclasses set ``num_tokens`` (K), ``hidden_size`` (d_vis), ``image_size``,
    ``mean``/``std`` (per channel, for pixels scaled to [0, 1]) and implement ``forward``.

    ``forward(pixel_values [n, 3, S, S]) -> [n, K, d_vis]``. Encoders are frozen: the model calls
    them under ``torch.no_grad()`` and keeps them in eval mode.
    """

    name: str = "base"
    num_tokens: int
    hidden_size: int
    image_size: int
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def spec(self) -> str:
        """The identifier stored in checkpoints (``build_encoder(spec)`` rebuilds this encoder)."""
        raise NotImplementedError

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB, resize (bicubic, to a square ``image_size``), scale to [0, 1], normalise.
        Returns float32 ``[n, 3, S, S]``."""
        s = self.image_size
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                raise TypeError(f"expected a PIL image, got {type(im).__name__}")
            im = im.convert("RGB").resize((s, s), Image.BICUBIC)
            a = (np.asarray(im, dtype=np.float32) / 255.0 - mean) / std
            out.append(torch.from_numpy(a.transpose(2, 0, 1).copy()))
        if not out:
            return torch.zeros(0, 3, s, s)
        return torch.stack(out)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Preprocess and run: ``[n, K, d_vis]`` on the encoder's device and dtype."""
        p = next(self.parameters())
        px = self.preprocess(images).to(device=p.device, dtype=p.dtype)
        if px.shape[0] == 0:
            return torch.zeros(0, self.num_tokens, self.hidden_size, device=p.device, dtype=p.dtype)
        return self(px)
