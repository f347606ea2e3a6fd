"""MMCA's two fast paths in torch, each equal to the reference (:mod:`visualchat.attention`) for the
case it takes (tests/test_kernels.py): prefill compaction for unpadded sequences, and the one-query
decode step. :func:`visualchat.kernels.attend` picks them."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention_common import masked_sdpa


def mmca_prefill(q, k, v, is_img, scale):
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
            text = masked_sdpa(qt, kt, vt, (tk[None, :] <= (tq + off)[:, None])[None], scale)
        if ik.numel():
            earlier = (ik[None, :] < (tq + off)[:, None])[None]  # [1, Nt, Ni]
            if earlier.any():
                text = text + masked_sdpa(qt, k.index_select(2, ik), v.index_select(2, ik), earlier, scale)
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


def mmca_decode(q, k, v, key_is_image, scale):
    """MMCA for one new text query per row, no padding: q ``[B, Hq, 1, D]``, k/v ``[B, Hkv, Lk, D]``.
    The scores are computed once for all keys; the text and image softmaxes are taken over the two
    masked copies and their probabilities added before the one product with V (the sum of the two
    terms, as in the paper). A handful of ops per layer instead of the prefill path's compaction.
    Returns None where it does not apply (the caller takes another path)."""
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
