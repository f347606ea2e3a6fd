"""The trainable map from vision-encoder features to rows of the LM's input embedding (``--vis_proj``).

Every kind takes one image's features ``[n, K_in, d_vis]`` and returns ``[n, K_out, H]``:

============== ========================================================== ===============
spec           what                                                       K_out
============== ========================================================== ===============
``linear``     one ``Linear(d_vis, H)`` per token (the default; every     K_in
               checkpoint from before ``--vis_proj`` is one)
``baseline``   ``Linear`` then ``LayerNorm(H)`` (the original code's       K_in
               "baseline" projection)
``mlp``        ``Linear(d_vis, H)``, GELU, ``Linear(H, H)`` (LLaVA-1.5)    K_in
``perceiver``  ``perceiver:N`` (default N = 16): N learned latent queries  N
               cross-attend to the image's tokens (plus a learned position
               embedding), then an MLP; one block, pre-LayerNorm
============== ========================================================== ===============

A checkpoint stores the module's ``state_dict`` under ``projection.`` (a linear one as
``projection.weight`` / ``projection.bias``, as always) and its spec in ``config.json``'s
``vis_proj``.
"""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("linear", "baseline", "mlp", "perceiver")
DEFAULT_LATENTS = 16


def parse_spec(spec: str) -> tuple[str, int]:
    """``"perceiver:32"`` -> ``("perceiver", 32)``; other kinds take no argument (latents 0)."""
    if not isinstance(spec, str):
        raise ValueError(f"vis_proj must be a string such as 'linear' or 'perceiver:16', got {spec!r}")
    kind, _, arg = spec.partition(":")
    if kind not in KINDS:
        raise ValueError(f"unknown vis_proj {spec!r}: choose one of {', '.join(KINDS)} (perceiver:N for N latents)")
    if kind != "perceiver":
        if arg:
            raise ValueError(f"vis_proj {kind!r} takes no ':' argument, got {spec!r}")
        return kind, 0
    try:
        n = int(arg) if arg else DEFAULT_LATENTS
    except ValueError:
        raise ValueError(f"vis_proj {spec!r}: the number of latents after ':' must be an integer") from None
    if not 1 <= n <= 4096:
        raise ValueError(f"vis_proj {spec!r}: the number of latents must be between 1 and 4096")
    return kind, n


class Perceiver(nn.Module):
    """``latents`` learned queries attend (multi-head) to the image's projected tokens."""

    def __init__(self, d_vis: int, hidden: int, in_tokens: int, latents: int, heads: int | None = None):
        super().__init__()
        heads = heads or next(h for h in (8, 4, 2, 1) if hidden % h == 0)
        self.inp = nn.Linear(d_vis, hidden)
        self.pos = nn.Parameter(torch.zeros(in_tokens, hidden))  # which token of the grid a feature came from
        self.latents = nn.Parameter(torch.randn(latents, hidden) * hidden ** -0.5)
        self.norm_q = nn.LayerNorm(hidden)
        self.norm_kv = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, K_in, d_vis] -> [n, latents, H]
        if x.shape[1] != self.pos.shape[0]:
            raise ValueError(f"the perceiver projection was built for {self.pos.shape[0]} image tokens, got {x.shape[1]}")
        kv = self.norm_kv(self.inp(x) + self.pos)  # [n, K_in, H]
        q = self.norm_q(self.latents).expand(x.shape[0], -1, -1)  # [n, latents, H]
        y = self.latents + self.attn(q, kv, kv, need_weights=False)[0]
        return y + self.mlp(self.norm_mlp(y))


class Projection(nn.Module):
    """``forward(features [n, K_in, d_vis]) -> [n, K_out, H]`` for any kind of :data:`KINDS`."""

    def __init__(self, spec: str, d_vis: int, hidden: int, in_tokens: int):
        super().__init__()
        self.spec = spec
        self.kind, latents = parse_spec(spec)
        self.in_tokens = in_tokens
        self.out_tokens = latents if self.kind == "perceiver" else in_tokens
        self.per_token = self.kind != "perceiver"  # each row depends on its own feature row alone
        if self.kind == "linear":
            self.net = nn.Linear(d_vis, hidden)
        elif self.kind == "baseline":
            self.net = nn.Sequential(nn.Linear(d_vis, hidden), nn.LayerNorm(hidden))
        elif self.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(d_vis, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        else:
            self.net = Perceiver(d_vis, hidden, in_tokens, latents)

    @property
    def first(self) -> nn.Linear:
        """The layer that reads the features (its weight sets the device and dtype)."""
        n = self.net
        return n if isinstance(n, nn.Linear) else (n.inp if isinstance(n, Perceiver) else n[0])

    # A linear projection keeps the attributes it had as a bare nn.Linear.
    @property
    def weight(self) -> nn.Parameter:
        return self._linear().weight

    @property
    def bias(self) -> nn.Parameter:
        return self._linear().bias

    def _linear(self) -> nn.Linear:
        if self.kind != "linear":
            raise AttributeError(f"a {self.spec!r} projection has no single weight; use .net or .parameters()")
        return self.net

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats)

    # A linear projection keeps the checkpoint names it always had (``projection.weight``/``.bias``).
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"projection." + _strip(k, self.kind): v for k, v in self.state_dict().items()}

    def checkpoint_key(self, name: str) -> str:
        """The state_dict name of a module parameter in the checkpoint (``net.weight`` -> ``projection.weight``)."""
        return "projection." + _strip(name, self.kind)

    @torch.no_grad()
    def load_checkpoint_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy in ``projection.*`` tensors named as :meth:`checkpoint_tensors` names them (the caller,
        :func:`visualchat.checkpoint.load_trainable`, has checked names, shapes and values)."""
        for k, p in self.state_dict(keep_vars=True).items():
            p.copy_(tensors[self.checkpoint_key(k)].to(p.dtype))


def _strip(name: str, kind: str) -> str:
    return name[len("net."):] if kind == "linear" else name
