"""The Qwen-VL visual encoder (own implementation): ViT-bigG/14 at 448 px, then a one-layer
cross-attention resampler (256 learned queries, 2D sin-cos positions) to the LM width.

Module names follow Qwen-VL's ``transformer.visual.*`` weights with that prefix stripped, so a
Qwen-VL checkpoint loads strictly. Two details of that checkpoint the maths must follow:

* the self-attention ``in_proj`` (a ``Linear(d, 3d)``, names ``attn.in_proj.weight/bias``) packs
  its output per head as ``[heads, (q | k | v), head_dim]``, not the ``[(q | k | v), heads,
  head_dim]`` of ``nn.MultiheadAttention``;
* the ViT's learned ``positional_embedding`` has 256 rows (a 16x16 grid) and is resized
  (bicubic) to the 32x32 patch grid; the resampler likewise resizes its query positions
  ``pos_embed`` (16x16) to the patch grid for the keys.
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .base import VisionEncoder
from .clip import CLIP_MEAN, CLIP_STD

PREFIX = "transformer.visual."


@dataclass
class QwenVLConfig:
    width: int = 1664
    layers: int = 48
    heads: int = 16
    mlp_ratio: float = 4.9231  # int(1664 * 4.9231) = 8192
    patch_size: int = 14
    image_size: int = 448
    n_queries: int = 256  # a square number: the resampler's query grid
    output_dim: int = 4096
    n_pos: int = 256  # rows of the ViT's learned positional embedding (a square grid)
    resampler_heads: int = 0  # 0: output_dim // 128 (32 for bigG), as in Qwen-VL

    @classmethod
    def bigG(cls) -> "QwenVLConfig":
        return cls()

    @classmethod
    def from_dict(cls, d: dict) -> "QwenVLConfig":
        """From e.g. the ``"visual"`` entry of a Qwen-VL ``config.json`` (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def mlp_width(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def attn_pool_heads(self) -> int:
        return self.resampler_heads or max(1, self.output_dim // 128)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, dim] fixed positions (MAE style), row-major over the grid: the first half of
    the channels encodes the column, the second half the row, each as [sin | cos]."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def enc(pos):  # [grid, grid] -> [grid^2, dim/2]
        a = pos.reshape(-1, 1).double() * omega
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([enc(cols), enc(rows)], dim=1).float()


def resize_pos(pos: torch.Tensor, n: int) -> torch.Tensor:
    """[L, C] positions on a sqrt(L) grid -> [n, C] on a sqrt(n) grid (bicubic)."""
    src, dst = math.isqrt(pos.shape[0]), math.isqrt(n)
    if src == dst:
        return pos
    grid = pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, src, src]
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(pos.dtype)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x):  # [n, L, d]
        n, L, d = x.shape
        qkv = self.in_proj(x).view(n, L, self.heads, 3, d // self.heads)  # per head: q | k | v
        q, k, v = qkv.permute(3, 0, 2, 1, 4)  # each [n, heads, L, hd]
        o = F.scaled_dot_product_attention(q, k, v)  # [n, heads, L, hd]
        return self.out_proj(o.transpose(1, 2).reshape(n, L, d))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = SelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(d, mlp)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(mlp, d))])
        )

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Resampler(nn.Module):
    """n_queries learned queries cross-attend (one layer) to the projected patch features."""

    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        d, grid = cfg.output_dim, math.isqrt(cfg.n_queries)
        assert grid * grid == cfg.n_queries, "n_queries must be a square number"
        self.register_buffer("pos_embed", sincos_2d(d, grid))  # [Q, D], stored in checkpoints
        self.query = nn.Parameter(torch.randn(cfg.n_queries, d) * 0.02)
        self.kv_proj = nn.Linear(cfg.width, d, bias=False) if cfg.width != d else nn.Identity()
        self.attn = nn.MultiheadAttention(d, cfg.attn_pool_heads, batch_first=True)
        self.ln_q = nn.LayerNorm(d, eps=1e-6)
        self.ln_kv = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x):  # [n, L, width] -> [n, Q, D]
        kv = self.ln_kv(self.kv_proj(x))  # [n, L, D]
        key = kv + resize_pos(self.pos_embed, x.shape[1])  # keys carry the patch positions
        q = (self.ln_q(self.query) + self.pos_embed).expand(x.shape[0], -1, -1)  # [n, Q, D]
        return self.attn(q, key, kv, need_weights=False)[0]


def checkpoint_files(path: str) -> list[str]:
    """The ``*.safetensors`` files of the checkpoint directory ``path`` (or ``path`` itself, one file)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]
    if not files or not all(os.path.isfile(f) and f.endswith(".safetensors") for f in files):
        raise FileNotFoundError(f"no *.safetensors files at {path} (only safetensors checkpoints are read)")
    return files


def checkpoint_config(path: str) -> QwenVLConfig:
    """The ``"visual"`` entry of ``config.json`` beside the checkpoint, else bigG."""
    cfg_file = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    visual = None
    if os.path.isfile(cfg_file):
        with open(cfg_file) as fh:
            visual = json.load(fh).get("visual")
    return QwenVLConfig.from_dict(visual) if visual else QwenVLConfig.bigG()


def check_keys(expected: set[str], found: set[str], path: str, config: QwenVLConfig) -> None:
    """Refuse a checkpoint whose ``transformer.visual.*`` names differ from the model's."""
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a Qwen-VL checkpoint matching {config}: "
            f"missing {len(missing)} '{PREFIX}*' keys {missing[:8]}, unexpected {len(unexpected)} {unexpected[:8]}"
        )


class QwenVLEncoder(VisionEncoder):
    """Frozen Qwen-VL visual encoder: ``[n, 3, 448, 448] -> [n, 256, 4096]`` for bigG."""

    name = "qwen-vl"
    mean = CLIP_MEAN
    std = CLIP_STD

    def __init__(self, config: QwenVLConfig | None = None, path: str | None = None):
        """Random weights (see :meth:`from_checkpoint` for pretrained ones)."""
        super().__init__()
        cfg = self.config = config or QwenVLConfig.bigG()
        self.path = path
        self.image_size, self.num_tokens, self.hidden_size = cfg.image_size, cfg.n_queries, cfg.output_dim
        w = cfg.width
        self.conv1 = nn.Conv2d(3, w, cfg.patch_size, cfg.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.n_pos, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w, eps=1e-6)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_width) for _ in range(cfg.layers))
        self.attn_pool = Resampler(cfg)
        self.ln_post = nn.LayerNorm(cfg.output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(cfg.output_dim, cfg.output_dim) * cfg.output_dim**-0.5)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str, config: QwenVLConfig | None = None, dtype=None) -> "QwenVLEncoder":
        """Load the ``transformer.visual.*`` tensors of the ``*.safetensors`` files in the
        directory ``path`` (or one such file). The config comes from ``config``, else from the
        ``"visual"`` entry of ``path/config.json``, else bigG."""
        from safetensors import safe_open

        files = checkpoint_files(path)
        config = config or checkpoint_config(path)
        sd = {}
        for f in files:
            with safe_open(f, framework="pt") as st:
                for k in st.keys():
                    if k.startswith(PREFIX):
                        sd[k[len(PREFIX):]] = st.get_tensor(k)
        with torch.device("meta"):  # no random init of ~2B parameters; load_state_dict assigns
            enc = cls(config, path=str(path))
        check_keys(set(enc.state_dict()), set(sd), path, config)
        if dtype is not None:
            sd = {k: v.to(dtype) for k, v in sd.items()}
        enc.load_state_dict(sd, strict=True, assign=True)
        return enc.requires_grad_(False).eval()

    def spec(self) -> str:
        if self.path is None:
            raise ValueError("this Qwen-VL encoder has random weights (no checkpoint path)")
        return f"qwen-vl:{self.path}"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, Q, D]"""
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)  # [n, L = (S/p)^2, width]
        x = self.ln_pre(x + resize_pos(self.positional_embedding, x.shape[1]))
        for block in self.transformer.resblocks:
            x = block(x)
        x = self.ln_post(self.attn_pool(x))  # [n, Q, D]
        return x @ self.proj

    def train(self, mode: bool = True):  # frozen: always eval
        return super().train(False)
