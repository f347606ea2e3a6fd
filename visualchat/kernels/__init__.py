"""MMCA's fast paths, and the one place that picks them.

Each computes what the reference (:mod:`visualchat.attention`: the masks and the sum of the two
softmaxes) computes, for the cases it takes, and is tested against it (tests/test_kernels.py and the
files named below):

- :mod:`.mmca_torch` ``mmca_prefill``: unpadded sequences (a prefill, a chunk after a cache) with
  the keys compacted, each key scored once;
- :mod:`.mmca_torch` ``mmca_decode``: one text query per row (a decode step), both softmaxes over one
  score matrix;
- :mod:`.attention_triton`: the fused Triton kernel, forward and backward, on CUDA
  (tests/test_attention_triton.py);
- :mod:`.decode`: a whole decode step of a LLaMA LM in fewer ops per layer (tests/test_lowp.py);
- :mod:`.lowp`: the frozen LM's linear weights in fp16 or bf16 on CPU (chosen by
  ``VisualChat.from_pretrained(lm_weights=...)``, not here).

Two environment variables switch paths off, for comparisons: ``VISUALCHAT_MMCA_KERNEL=torch`` keeps
CUDA on the torch paths (no Triton); ``VISUALCHAT_DECODE=hf`` turns off the one-query branch and the
lean decoder (transformers' decode step, as before them).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def triton_off() -> bool:
    """``VISUALCHAT_MMCA_KERNEL=torch``: no Triton kernel, even where it runs."""
    return os.environ.get("VISUALCHAT_MMCA_KERNEL", "").lower() == "torch"


def hf_decode() -> bool:
    """``VISUALCHAT_DECODE=hf``: transformers' decode step (no one-query branch, no lean decoder)."""
    return os.environ.get("VISUALCHAT_DECODE", "").lower() == "hf"


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_is_image: torch.Tensor,
           key_padding_mask: torch.Tensor | None, scale: float | None, mode: str,
           window: int | None) -> torch.Tensor | None:
    """The fastest path that applies to this attention call (arguments as
    :func:`visualchat.attention.mmca_attention`, shapes already checked), or None: the reference."""
    lq, lk = query.shape[2], key.shape[2]
    if window is not None and lk > window:  # some key is out of some query's window: the reference
        return None
    if mode == "mmca" and query.is_cuda and not triton_off():
        from . import attention_triton  # imports triton only if installed

        if attention_triton.available(query.device) and attention_triton.supports(query):
            return attention_triton.mmca_attention_triton(query, key, value, key_is_image, key_padding_mask, scale)
    if mode == "causal" and key_padding_mask is None and lq == lk:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                              enable_gqa=query.shape[1] != key.shape[1])
    if mode != "mmca":
        return None
    from .mmca_torch import mmca_decode, mmca_prefill

    if lq == 1 and key_padding_mask is None and not hf_decode():
        out = mmca_decode(query, key, value, key_is_image, scale)
        if out is not None:
            return out
    if key_padding_mask is None or bool(key_padding_mask.all()):
        return torch.cat([mmca_prefill(query[i:i + 1], key[i:i + 1], value[i:i + 1], key_is_image[i].bool(), scale)
                          for i in range(query.shape[0])])
    return None


def lean_decoder(vc):
    """The :class:`~.decode.LeanDecoder` for ``vc`` (a VisualChat; built once, kept on it), or
    None where it does not apply. Checked again only when the model, its weight format,
    ``VISUALCHAT_DECODE`` or the process group changed (once per step otherwise costs a walk over
    every layer)."""
    from .decode import LeanDecoder, unsupported_reason
    from .lowp import lm_format

    key = (vc.model, lm_format(vc.model.lm), hf_decode(),
           torch.distributed.is_available() and torch.distributed.is_initialized())
    cached = getattr(vc, "_lean_decoder", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    lean = None if hf_decode() or unsupported_reason(vc.model) is not None else LeanDecoder(vc.model)
    vc._lean_decoder = (key, lean)
    return lean
