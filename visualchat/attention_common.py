"""What MMCA's reference (:mod:`visualchat.attention`) and its fast paths (:mod:`visualchat.kernels`) share,
without the fast paths importing the reference: the shape contract and a masked SDPA."""
from __future__ import annotations

import torch.nn.functional as F


def check_shapes(query, key, value, key_is_image, key_padding_mask=None) -> None:
    """Raise ValueError unless q ``[B, Hq, Lq, D]``, k/v ``[B, Hkv, Lk, D]`` (Hq a multiple of Hkv,
    Lq <= Lk), key_is_image and key_padding_mask ``[B, Lk]`` fit together."""
    b, hq, lq, _ = query.shape
    bk, hkv, lk, _ = key.shape
    if bk != b or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if lq > lk:
        raise ValueError(f"more queries ({lq}) than keys ({lk})")
    if tuple(key_is_image.shape) != (b, lk):
        raise ValueError(f"key_is_image has shape {tuple(key_is_image.shape)}, expected {(b, lk)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, lk):
        raise ValueError(f"key_padding_mask has shape {tuple(key_padding_mask.shape)}, expected {(b, lk)}")


def masked_sdpa(q, k, v, mask, scale):
    """SDPA with a boolean ``mask [B, Lq, Lk]`` (True = attend). Rows with no allowed key give exactly
    0 (and zero gradients), never NaN: they attend to everything and the result is multiplied by 0."""
    has_key = mask.any(dim=-1)  # [B, Lq]
    mask = mask | ~has_key[..., None]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # [B, Hq, Lq, D]
    return out * has_key[:, None, :, None].to(out.dtype)
