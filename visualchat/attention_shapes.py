"""The shape contract of the attention functions, shared by the torch path (:mod:`visualchat.attention`)
and the fused Triton kernel (:mod:`visualchat.attention_triton`) without either importing the other."""
from __future__ import annotations


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
