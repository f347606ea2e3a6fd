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

On CUDA, ``mode="mmca"`` runs the fused Triton kernel of :mod:`visualchat.attention_triton` when
triton is installed (``VISUALCHAT_MMCA_KERNEL=torch`` keeps the torch path below).
"""
from __future__ import annotations

import contextvars
import os

import torch
import torch.nn.functional as F

from .attention_shapes import check_shapes  # noqa: F401 - part of this module's API
from .config import ATTENTION_MODES

ATTN_IMPLEMENTATION = "visualchat"
MODES = ATTENTION_MODES  # visualchat.config.AttentionMode


def _masked_sdpa(q, k, v, mask, scale):
    """SDPA with a boolean ``mask [B, Lq, Lk]`` (True = attend). Rows with no allowed key give exactly
    0 (and zero gradients), never NaN: they attend to everything and the result is multiplied by 0."""
    has_key = mask.any(dim=-1)  # [B, Lq]
    mask = mask | ~has_key[..., None]
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask[:, None], scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )  # [B, Hq, Lq, D]
    return out * has_key[:, None, :, None].to(out.dtype)


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


def _mmca_prefill(q, k, v, is_img, scale):
    """MMCA for one unpadded sequence: q ``[1, Hq, Lq, D]`` (the last Lq positions: a whole prefill, a
    chunk after a cache, or one decode step), k/v ``[1, Hkv, Lk, D]``, is_img ``[Lk]``. Less work than
    causal attention: image queries just copy their value row; text queries attend to the text keys
    alone (compacted: plain causal SDPA when Lq == Lk) plus, separately, to the earlier image keys, so
    each key is scored once instead of once per term."""
    lq, lk = q.shape[2], k.shape[2]
    off = lk - lq  # position of the first query
    q_img = is_img[off:]
    tq, iq = (~q_img).nonzero().flatten(), q_img.nonzero().flatten()  # query rows
    tk, ik = (~is_img).nonzero().flatten(), is_img.nonzero().flatten()  # key positions
    groups = q.shape[1] // k.shape[1]
    out = q.new_zeros(q.shape)
    if iq.numel():
        own = v.index_select(2, iq + off).repeat_interleave(groups, dim=1)  # [1, Hq, Ni, D]
        out = out.index_copy(2, iq, own)
    if tq.numel():
        qt = q.index_select(2, tq)
        kt, vt = k.index_select(2, tk), v.index_select(2, tk)
        if lq == lk:  # the text queries are the text keys
            text = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=groups > 1)
        else:
            text = _masked_sdpa(qt, kt, vt, (tk[None, :] <= (tq + off)[:, None])[None], scale)
        if ik.numel():
            earlier = (ik[None, :] < (tq + off)[:, None])[None]  # [1, Nt, Ni]
            if earlier.any():
                text = text + _masked_sdpa(qt, k.index_select(2, ik), v.index_select(2, ik), earlier, scale)
        out = out.index_copy(2, tq, text)
    return out


_decode_plan: tuple = (None, None)  # (key_is_image tensor, its additive masks): shared by all layers of a step


def _decode_masks(key_is_image: torch.Tensor):
    """For a decode step whose query (the last key) is text: ``[2, B, 1, 1, Lk]`` additive masks (0 or
    -inf) for MMCA's text term (text keys) and image term (image keys, all earlier than the query), or
    ``"text"`` when no row has an image key, or None when the fast path does not apply (an image query,
    or rows with and without images mixed). Computed once per step: every layer gets the same
    ``key_is_image`` tensor."""
    global _decode_plan
    cached, plan = _decode_plan  # one read: another thread may replace it meanwhile
    if cached is key_is_image:
        return plan
    is_img = key_is_image.bool()
    has_img = is_img.any(dim=-1)
    if bool(is_img[:, -1].any()):
        plan = None
    elif not bool(has_img.any()):
        plan = "text"
    elif not bool(has_img.all()):
        plan = None
    else:
        zero = torch.zeros((), device=is_img.device)
        ninf = torch.full((), float("-inf"), device=is_img.device)
        plan = torch.stack([torch.where(is_img, ninf, zero), torch.where(is_img, zero, ninf)])[:, :, None, None, :]
    _decode_plan = (key_is_image, plan)
    return plan


def _mmca_decode(q, k, v, key_is_image, scale):
    """MMCA for one new text query per row, no padding: q ``[B, Hq, 1, D]``, k/v ``[B, Hkv, Lk, D]``.
    The scores are computed once for all keys; the text and image softmaxes are taken over the two
    masked copies and their probabilities added before the one product with V (the sum of the two
    terms, as in the paper). A handful of ops per layer instead of the prefill path's compaction.
    Returns None where it does not apply (the caller takes the general path)."""
    plan = _decode_masks(key_is_image)
    if plan is None:
        return None
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    if isinstance(plan, str):  # text keys only: one softmax over all of them
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=hq != hkv)
    g = hq // hkv
    qg = q.reshape(b, hkv, g, d) * (d ** -0.5 if scale is None else scale)
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [B, Hkv, g, Lk]
    probs = torch.softmax(scores.float() + plan, dim=-1).sum(0)  # text term + image term, float32
    return torch.matmul(probs.to(v.dtype), v).reshape(b, hq, 1, d)


def mmca_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_is_image: torch.Tensor,
                   key_padding_mask: torch.Tensor | None = None, scale: float | None = None,
                   mode: str = "mmca", window: int | None = None) -> torch.Tensor:
    """query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]`` (Hq a multiple of Hkv), the queries being
    the last Lq of the Lk positions; key_is_image and key_padding_mask ``[B, Lk]`` bool.
    Returns ``[B, Hq, Lq, D]``. ``mode="causal"`` is standard causal attention over all tokens.
    ``window``: a sliding window (keys at distance >= window are left out), or None."""
    check_shapes(query, key, value, key_is_image, key_padding_mask)
    b, hq, lq, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    if window is not None and window < 1:
        raise ValueError(f"sliding window must be >= 1, got {window}")
    if window is not None and lk > window:  # some key is out of some query's window: the masked path
        masks = build_masks(key_is_image, lq, key_padding_mask, mode, window)
        return _sum_of_terms(query, key, value, masks, scale)
    if mode == "mmca" and query.is_cuda and os.environ.get("VISUALCHAT_MMCA_KERNEL", "").lower() != "torch":
        from . import attention_triton  # the fused kernel; imports triton only if installed

        if attention_triton.available(query.device) and attention_triton.supports(query):
            return attention_triton.mmca_attention_triton(query, key, value, key_is_image, key_padding_mask, scale)
    if mode == "causal" and key_padding_mask is None and lq == lk:
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                              enable_gqa=hq != hkv)
    if mode == "mmca" and lq == 1 and key_padding_mask is None and os.environ.get("VISUALCHAT_DECODE") != "hf":
        out = _mmca_decode(query, key, value, key_is_image, scale)
        if out is not None:
            return out
    if mode == "mmca" and (key_padding_mask is None or bool(key_padding_mask.all())):
        return torch.cat([_mmca_prefill(query[i:i + 1], key[i:i + 1], value[i:i + 1], key_is_image[i].bool(), scale)
                          for i in range(b)])
    return _sum_of_terms(query, key, value, build_masks(key_is_image, lq, key_padding_mask, mode), scale)


def _sum_of_terms(query, key, value, masks: list[torch.Tensor], scale) -> torch.Tensor:
    """One masked softmax per mask of :func:`build_masks`, added."""
    out = _masked_sdpa(query, key, value, masks[0], scale)
    for m in masks[1:]:
        if m.any():  # no earlier image anywhere: the image term is exactly 0, skip its work
            out = out + _masked_sdpa(query, key, value, m, scale)
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
