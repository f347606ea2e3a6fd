"""Multi-modal causal attention (MMCA) and the plain causal baseline, registered with transformers.

MMCA (paper, section 4): an image token attends only to itself. A text token at position i gets two
terms, added: a softmax over text keys at positions <= i, and a separate softmax over image keys at
positions < i (exactly 0 when there is none).

Any HF causal LM whose attention goes through ``ALL_ATTENTION_FUNCTIONS`` runs it once its config
says ``_attn_implementation = "visualchat"``. Per forward, pass these keyword arguments to the LM (they
travel down to every attention layer through transformers' ``**kwargs``):

- ``vc_key_is_image``: ``[B, Lk]`` bool for every key, the cached ones included;
- ``vc_key_padding_mask``: ``[B, Lk]`` bool, True for real tokens (optional);
- ``vc_attention_mode``: ``"mmca"`` (default) or ``"causal"``.

Layers with a sliding window (transformers passes ``sliding_window``, e.g. Mistral) get it in both
modes: a query at position i sees keys at positions > i - window, in each of MMCA's two terms.
Attention-logit soft-capping (Gemma-2) and attention sinks (gpt-oss) are refused with a clear error
rather than silently ignored.

This file is the reference: :func:`build_masks` and :func:`reference_attention` (one masked softmax per
term, added). :func:`mmca_attention` runs the fastest path of :mod:`visualchat.kernels` that applies to
a call (each equal to the reference) and the reference otherwise.
"""
from __future__ import annotations

import contextvars

import torch

from . import kernels
from .attention_common import check_shapes, masked_sdpa
from .config import ATTENTION_MODES

ATTN_IMPLEMENTATION = "visualchat"
MODES = ATTENTION_MODES  # visualchat.config.AttentionMode


def build_masks(key_is_image: torch.Tensor, lq: int, key_padding_mask: torch.Tensor | None = None,
                mode: str = "mmca", window: int | None = None) -> list[torch.Tensor]:
    """The boolean masks ``[B, Lq, Lk]`` (True = attend) whose softmax terms are summed: one mask for
    ``causal``, two (text term, image term) for ``mmca``. ``window``: keys at distance >= window from
    the query are left out (sliding-window layers). Vectorised; no loop over tokens."""
    b, lk = key_is_image.shape
    dev = key_is_image.device
    kpos = torch.arange(lk, device=dev)
    qpos = kpos[lk - lq:]  # the queries are the last Lq positions
    causal = kpos[None, :] <= qpos[:, None]  # [Lq, Lk]
    if window is not None:
        causal = causal & (qpos[:, None] - kpos[None, :] < window)
    valid = key_padding_mask[:, None, :].bool() if key_padding_mask is not None else torch.ones(
        b, 1, lk, dtype=torch.bool, device=dev)
    if mode == "causal":
        return [causal[None] & valid]
    if mode != "mmca":
        raise ValueError(f"unknown attention mode {mode!r}; expected one of {MODES}")
    k_img = key_is_image.bool()[:, None, :]  # [B, 1, Lk]
    q_img = key_is_image.bool()[:, lk - lq:, None]  # [B, Lq, 1]
    is_self = (kpos[None, :] == qpos[:, None])[None]  # [1, Lq, Lk]
    earlier = (causal & ~is_self[0])[None]
    text_term = torch.where(q_img, is_self, causal[None] & ~k_img) & valid
    image_term = ~q_img & earlier & k_img & valid
    return [text_term, image_term]


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_is_image: torch.Tensor,
                        key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                        mode: str = "mmca", window: int | None = None) -> torch.Tensor:
    """MMCA by its definition: one masked softmax per mask of :func:`build_masks`, added (arguments as
    :func:`mmca_attention`)."""
    masks = build_masks(key_is_image, query.shape[2], key_padding_mask, mode, window)
    out = masked_sdpa(query, key, value, masks[0], scale)
    for m in masks[1:]:
        if m.any():  # no earlier image anywhere: the image term is exactly 0, skip its work
            out = out + masked_sdpa(query, key, value, m, scale)
    return out


def mmca_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_is_image: torch.Tensor,
                   key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                   mode: str = "mmca", window: int | None = None) -> torch.Tensor:
    """query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]`` (Hq a multiple of Hkv), the queries being
    the last Lq of the Lk positions; key_is_image and key_padding_mask ``[B, Lk]`` bool.
    Returns ``[B, Hq, Lq, D]``. ``mode="causal"`` is standard causal attention over all tokens.
    ``window``: a sliding window (keys at distance >= window are left out), or None. Runs
    :func:`visualchat.kernels.attend`'s fast path where one applies, else :func:`reference_attention`."""
    check_shapes(query, key, value, key_is_image, key_padding_mask)
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    out = kernels.attend(query, key, value, key_is_image, key_padding_mask, scale, mode, window)
    if out is None:
        out = reference_attention(query, key, value, key_is_image, key_padding_mask, scale, mode, window)
    return out


#: A callable ``capture(module, query, key, key_is_image, key_padding_mask, scale, mode, window)`` that
#: every attention layer calls (with its post-RoPE query and all its keys) while it is set, in this
#: thread only; None, the default, costs nothing. :mod:`visualchat.attention_maps` sets it for the one
#: extra forward that records where the answer tokens looked.
CAPTURE: contextvars.ContextVar = contextvars.ContextVar("visualchat_attention_capture", default=None)


def hf_attention_forward(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """The function registered with transformers' ``AttentionInterface`` as ``"visualchat"``.
    Returns ``([B, Lq, Hq, D], None)`` as transformers expects."""
    for name, what in (("softcap", "attention-logit soft-capping"), ("s_aux", "attention sinks")):
        if kwargs.get(name) is not None:
            raise ValueError(f"this model's attention uses {what} ({name}), which the visualchat (MMCA) attention "
                             "does not implement")
    key_is_image = kwargs.get("vc_key_is_image")
    padding = kwargs.get("vc_key_padding_mask")
    mode = kwargs.get("vc_attention_mode", "mmca")
    window = kwargs.get("sliding_window")
    b, lk = key.shape[0], key.shape[2]
    if key_is_image is None:  # plain text: MMCA and causal agree
        key_is_image = torch.zeros(b, lk, dtype=torch.bool, device=key.device)
    elif key_is_image.shape[-1] > lk and window is not None:
        # a sliding-window cache layer keeps only the latest keys (contiguous, ending at the queries)
        key_is_image = key_is_image[:, -lk:]
        padding = padding[:, -lk:] if padding is not None else None
    elif key_is_image.shape[-1] != lk:
        raise ValueError(
            f"vc_key_is_image covers {key_is_image.shape[-1]} keys but this layer has {lk} "
            "(it must cover the cached keys too)")
    capture = CAPTURE.get()
    if capture is not None:
        capture(module, query, key, key_is_image.to(key.device), padding, scaling, mode, window)
    out = mmca_attention(query, key, value, key_is_image.to(key.device), padding, scaling, mode, window)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register ``"visualchat"`` with transformers (idempotent) and return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, hf_attention_forward)
    return ATTN_IMPLEMENTATION


register()
