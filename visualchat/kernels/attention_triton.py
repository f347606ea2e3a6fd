"""A fused multi-modal causal attention (MMCA) kernel in Triton: forward and backward.

Semantics (same contract as the reference :func:`visualchat.attention.mmca_attention` with ``mode="mmca"``): keys and
queries are positions of one sequence, the Lq queries being the last Lq of the Lk positions
(``off = Lk - Lq``). Per token a ``kind`` byte says padding (0), text (1) or image (2).

- An image query copies its own value row: ``O[i] = V[i]``.
- A text query at position i gets two softmax terms, added::

      O[i] = softmax_{j in T(i)}(s_ij) @ V  +  softmax_{j in I(i)}(s_ij) @ V
      T(i) = real text keys j <= i,   I(i) = real image keys j < i,   s_ij = scale * q_i . k_j

  The image term is exactly 0 when I(i) is empty.
- Padded query rows output 0; padded keys are in no set.

Forward (one program per query tile and query head, one pass over the key tiles up to the causal
bound). The two terms are two independent online softmaxes (FlashAttention style) kept side by side:
for each term x in {text, image} a running row max ``m_x``, a running denominator ``l_x`` and an
unnormalised accumulator ``acc_x``. For a key tile with scores ``s`` masked to the term's keys::

      m_new = max(m_x, rowmax(s));  alpha = exp(m_x - m_new);  p = exp(s - m_new)
      l_x   = alpha * l_x + rowsum(p);  acc_x = alpha * acc_x + p @ V_tile;  m_x = m_new

and at the end ``O_x = acc_x / l_x`` (0 when l_x == 0, i.e. the term has no key). The exponentials
are taken in base 2 (scores pre-multiplied by log2(e)), as usual. Work is skipped at tile level: a
query tile without a text query runs no key loop at all (its rows copy their value rows); a key tile
without a text key skips the text update, one without an image key skips the image update. The
forward saves, per row, ``lse_x = m_x + log(l_x)`` (natural log, in units of the scaled scores;
-inf for an empty term) and ``O_image`` (so that ``O_text = O - O_image``): O(N) memory, never N x N.

Backward (FlashAttention-2 style, two kernels, the probabilities recomputed from lse). The two
terms' key sets are disjoint, so each (i, j) pair belongs to at most one term x(i, j), and::

      P_ij  = exp(s_ij - lse_{x(i,j)}(i))            (0 outside both sets)
      dV_j  = sum_i P_ij dO_i        + [j is an image query] dO_j   (the copy of image queries)
      dP_ij = dO_i . V_j
      dS_ij = P_ij (dP_ij - D_{x(i,j)}(i)),  D_x(i) = rowsum(dO_i * O_x(i))   (per-term softmax Jacobian)
      dQ_i  = scale * sum_j dS_ij K_j,       dK_j = scale * sum_i dS_ij Q_i

so a single recomputed P (with lse and D picked per element by the key's kind) serves both terms.
Image query rows have no dQ and contribute no dK. One kernel walks the query tiles for each key tile
(dK, dV; for GQA it loops over the query heads of the kv group, so the group sum needs no atomics),
the other walks the key tiles for each query tile (dQ). D is a cheap row reduction done in torch.

All accumulation is in float32 (fp32 inputs use IEEE fp32 dots, not TF32); inputs may be fp32,
bf16 or fp16; any head dim up to 256 (loads are masked to a power-of-two tile of at least 16); any
strides with a contiguous last dim (HF's ``[B, L, H, D]`` transposed views need no copy).
Decode (Lq = 1) runs one program per (batch, head) over all keys, without a split over the keys.
"""
from __future__ import annotations

import math
import os

import torch

from ..attention_common import check_shapes

try:  # triton is optional: importing this module (or visualchat) never requires it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256
_LOG2E = 1.4426950408889634  # log2(e): the kernels work in log2 units (exp2), lse is stored in natural log
_LN2 = 0.6931471805599453  # ln(2) = 1 / log2(e)

#: whether this module's kernels were built for triton's CPU interpreter (TRITON_INTERPRET=1 is read
#: by ``triton.jit`` when the kernels below are decorated, i.e. when this module is imported)
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def available(device=None) -> bool:
    """True when triton imports and either ``device`` is a CUDA device or TRITON_INTERPRET=1."""
    if triton is None:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    return device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available()


def supports(query: torch.Tensor) -> bool:
    """Whether the kernel handles this query's dtype and head dim (otherwise use the torch path)."""
    return query.dtype in DTYPES and query.shape[-1] <= MAX_HEAD_DIM


if triton is not None:
    LOG2E = tl.constexpr(_LOG2E)  # the same constants inside the kernels (triton reads constexpr globals)
    LN2 = tl.constexpr(_LN2)

    @triton.jit
    def _online_softmax_step(m, l, acc, s, v, PREC: tl.constexpr):
        """One key tile of an online softmax (log2 units): running max ``m`` and sum ``l`` ``[M]`` and
        the weighted sum of values ``acc`` ``[M, D]`` updated with scores ``s`` ``[M, N]`` (-inf where a
        key is not in the term) and the tile's values ``v`` ``[N, D]``. Rows with every key masked so far
        stay at m = -inf, l = 0, acc = 0 (no -inf - -inf)."""
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_use)
        p = tl.exp2(s - m_use[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l, acc

    @triton.jit
    def _recompute_probs(s, in_t, in_i, lse_t, lse_i):
        """The forward's probabilities again, for the backward: ``exp2(s - lse)`` with each (key, query)
        pair's own term's lse (log2 units, broadcast to ``s``; finite whenever the pair is in the term).
        Pairs in neither term get lse = +inf, so p = exp2(s - inf) = 0 (scores are always finite)."""
        return tl.exp2(s - tl.where(in_t, lse_t, tl.where(in_i, lse_i, float("inf"))))

    @triton.jit
    def _mmca_fwd(Q, K, V, KIND, O, OI, LSE_T, LSE_I,
                  sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som, skind,
                  HQ, G, LQ, LK, D, qk_scale,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  PREC: tl.constexpr, STORE_OI: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HQ
        h = pid_bh % HQ
        kvh = h // G
        off = LK - LQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # query index
        pos_m = off + offs_m  # absolute position of each query
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < LQ
        d_ok = offs_d < D

        kind_base = KIND + b.to(tl.int64) * skind
        q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
        k_base = K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh

        kind_q = tl.load(kind_base + pos_m, mask=row_ok, other=0)
        q_text = kind_q == 1
        q_img = kind_q == 2
        q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)

        m_t = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_t = tl.zeros([BLOCK_M], tl.float32)
        acc_t = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_i = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # keys up to the last query of the tile (causal bound); none at all for a tile without text queries
        has_text_q = tl.max(q_text.to(tl.int32), axis=0)
        hi = tl.minimum(off + (pid_m + 1) * BLOCK_M, LK) * has_text_q
        for start_n in range(0, hi, BLOCK_N):
            offs_k = start_n + offs_n
            key_ok = offs_k < LK
            kind_k = tl.load(kind_base + offs_k, mask=key_ok, other=0)
            k_text = kind_k == 1
            k_img = kind_k == 2
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [M, N], log2 units
            earlier = offs_k[None, :] < pos_m[:, None]

            if tl.max(k_text.to(tl.int32), axis=0) > 0:  # text term: text keys at j <= i
                s_t = tl.where(k_text[None, :] & (earlier | (offs_k[None, :] == pos_m[:, None])), s, float("-inf"))
                m_t, l_t, acc_t = _online_softmax_step(m_t, l_t, acc_t, s_t, v, PREC)

            if tl.max(k_img.to(tl.int32), axis=0) > 0:  # image term: image keys at j < i
                s_i = tl.where(k_img[None, :] & earlier, s, float("-inf"))
                m_i, l_i, acc_i = _online_softmax_step(m_i, l_i, acc_i, s_i, v, PREC)

        o_t = acc_t / tl.where(l_t > 0, l_t, 1.0)[:, None]
        o_i = acc_i / tl.where(l_i > 0, l_i, 1.0)[:, None]
        # image queries copy their own value row (a masked load: nothing is read for the other rows)
        own = tl.load(v_base + pos_m[:, None] * svn + offs_d[None, :],
                      mask=(q_img & row_ok)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        out = tl.where(q_text[:, None], o_t + o_i, own)  # padded rows: own == 0
        o_off = b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_d[None, :]
        o_mask = row_ok[:, None] & d_ok[None, :]
        tl.store(O + o_off, out.to(O.dtype.element_ty), mask=o_mask)
        if STORE_OI:
            tl.store(OI + o_off, tl.where(q_text[:, None], o_i, 0.0).to(OI.dtype.element_ty), mask=o_mask)
            lse_t = tl.where(q_text & (l_t > 0), (m_t + tl.log2(tl.where(l_t > 0, l_t, 1.0))) * LN2, float("-inf"))
            lse_i = tl.where(q_text & (l_i > 0), (m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0))) * LN2, float("-inf"))
            lse_off = pid_bh.to(tl.int64) * LQ + offs_m  # lse tensors are contiguous [B, HQ, LQ]
            tl.store(LSE_T + lse_off, lse_t, mask=row_ok)
            tl.store(LSE_I + lse_off, lse_i, mask=row_ok)

    @triton.jit
    def _mmca_bwd_dkdv(Q, K, V, KIND, DO, LSE_T, LSE_I, DT, DI, DK, DV,
                       sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, skind,
                       HQ, HKV, G, LQ, LK, D, qk_scale, sm_scale,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       PREC: tl.constexpr):
        """One program per key tile and kv head: dK, dV summed over the kv group's query heads."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HKV
        kvh = pid_bh % HKV
        off = LK - LQ
        offs_k = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_mb = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        key_ok = offs_k < LK
        d_ok = offs_d < D

        kind_base = KIND + b.to(tl.int64) * skind
        kind_k = tl.load(kind_base + offs_k, mask=key_ok, other=0)
        k_text = kind_k == 1
        k_img = kind_k == 2
        kv_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh + offs_k[:, None] * skn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        v = tl.load(V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh + offs_k[:, None] * svn + offs_d[None, :],
                    mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

        # queries that can see a key of this tile: positions >= the tile's first key; none if all padding
        has_key = tl.max((kind_k != 0).to(tl.int32), axis=0)
        m_lo = tl.maximum(pid_n * BLOCK_N - off, 0)
        m_hi = LQ * has_key
        own = k_img & (offs_k >= off)  # image keys that are also queries: O[i] = V[i]
        for g in range(0, G):
            h = kvh * G + g
            bh = b * HQ + h
            q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
            do_base = DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh
            for start_m in range(m_lo, m_hi, BLOCK_M):
                offs_m = start_m + offs_mb
                row_ok = offs_m < LQ
                pos_m = off + offs_m
                kind_q = tl.load(kind_base + pos_m, mask=row_ok, other=0)
                q_text = kind_q == 1
                if tl.max(q_text.to(tl.int32), axis=0) > 0:  # image / padded query rows add nothing here
                    qd_mask = row_ok[:, None] & d_ok[None, :]
                    q = tl.load(q_base + offs_m[:, None] * sqm + offs_d[None, :], mask=qd_mask, other=0.0)
                    do = tl.load(do_base + offs_m[:, None] * sdom + offs_d[None, :], mask=qd_mask, other=0.0)
                    row = bh.to(tl.int64) * LQ + offs_m
                    lse_t = tl.load(LSE_T + row, mask=row_ok, other=0.0) * LOG2E
                    lse_i = tl.load(LSE_I + row, mask=row_ok, other=0.0) * LOG2E
                    d_t = tl.load(DT + row, mask=row_ok, other=0.0)
                    d_i = tl.load(DI + row, mask=row_ok, other=0.0)
                    st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale  # [N, M], log2 units
                    in_t = k_text[:, None] & q_text[None, :] & (offs_k[:, None] <= pos_m[None, :])
                    in_i = k_img[:, None] & q_text[None, :] & (offs_k[:, None] < pos_m[None, :])
                    p = _recompute_probs(st, in_t, in_i, lse_t[None, :], lse_i[None, :])
                    dv += tl.dot(p.to(do.dtype), do, input_precision=PREC)
                    dp = tl.dot(v, tl.trans(do), input_precision=PREC)  # [N, M]
                    ds = p * (dp - tl.where(in_t, d_t[None, :], d_i[None, :]))
                    dk += tl.dot(ds.to(q.dtype), q, input_precision=PREC)
            # the image queries' copy: dV[i] += dO[i]
            do_own = tl.load(do_base + (offs_k - off)[:, None] * sdom + offs_d[None, :],
                             mask=own[:, None] & d_ok[None, :], other=0.0)
            dv += do_own.to(tl.float32)

        dk = dk * sm_scale
        kv_off = pid_bh.to(tl.int64) * LK * D + offs_k[:, None] * D + offs_d[None, :]  # DK/DV contiguous
        tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _mmca_bwd_dq(Q, K, V, KIND, DO, LSE_T, LSE_I, DT, DI, DQ,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, skind,
                     HQ, G, LQ, LK, D, qk_scale, sm_scale,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     PREC: tl.constexpr):
        """One program per query tile and query head: dQ over the key tiles up to the causal bound."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // HQ
        h = pid_bh % HQ
        kvh = h // G
        off = LK - LQ
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pos_m = off + offs_m
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < LQ
        d_ok = offs_d < D

        kind_base = KIND + b.to(tl.int64) * skind
        k_base = K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
        v_base = V + b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
        kind_q = tl.load(kind_base + pos_m, mask=row_ok, other=0)
        q_text = kind_q == 1
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + offs_m[:, None] * sqm + offs_d[None, :],
                    mask=qd_mask, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * sdob + h.to(tl.int64) * sdoh + offs_m[:, None] * sdom + offs_d[None, :],
                     mask=qd_mask, other=0.0)
        row = pid_bh.to(tl.int64) * LQ + offs_m
        lse_t = tl.load(LSE_T + row, mask=row_ok, other=0.0) * LOG2E
        lse_i = tl.load(LSE_I + row, mask=row_ok, other=0.0) * LOG2E
        d_t = tl.load(DT + row, mask=row_ok, other=0.0)
        d_i = tl.load(DI + row, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        has_text_q = tl.max(q_text.to(tl.int32), axis=0)
        hi = tl.minimum(off + (pid_m + 1) * BLOCK_M, LK) * has_text_q
        for start_n in range(0, hi, BLOCK_N):
            offs_k = start_n + offs_n
            key_ok = offs_k < LK
            kind_k = tl.load(kind_base + offs_k, mask=key_ok, other=0)
            kv_mask = key_ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + offs_k[:, None] * skn + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * svn + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [M, N], log2 units
            in_t = q_text[:, None] & (kind_k == 1)[None, :] & (offs_k[None, :] <= pos_m[:, None])
            in_i = q_text[:, None] & (kind_k == 2)[None, :] & (offs_k[None, :] < pos_m[:, None])
            p = _recompute_probs(s, in_t, in_i, lse_t[:, None], lse_i[:, None])
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - tl.where(in_t, d_t[:, None], d_i[:, None]))
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)

        dq = dq * sm_scale
        tl.store(DQ + pid_bh.to(tl.int64) * LQ * D + offs_m[:, None] * D + offs_d[None, :],  # DQ contiguous
                 dq.to(DQ.dtype.element_ty), mask=qd_mask)


def _configs(d: int, block_m: int | None, block_n: int | None):
    """``(BLOCK_D, {kernel: (BLOCK_M, BLOCK_N, num_warps, num_stages)})``; BLOCK_M is the query tile
    and BLOCK_N the key tile in every kernel. Not autotuned nor timed yet: tiles that compile for
    sm_90 in bf16/fp16 without register spills (ptxas -v, triton 3.5; fp32 inputs spill a little).
    ``block_m``/``block_n`` override all three (the tests use 16 or 32: many tiles, ragged tails)."""
    block_d = max(16, triton.next_power_of_2(d))
    if block_d <= 64:
        cfg = {"fwd": (64, 64, 8, 2), "dkdv": (32, 64, 8, 2), "dq": (64, 64, 4, 2)}
    elif block_d <= 128:
        cfg = {"fwd": (64, 32, 8, 2), "dkdv": (64, 32, 8, 2), "dq": (64, 32, 4, 2)}
    else:
        cfg = {"fwd": (32, 32, 8, 1), "dkdv": (16, 32, 8, 1), "dq": (32, 32, 8, 1)}
    cfg = {k: (block_m or bm, block_n or bn, w, st) for k, (bm, bn, w, st) in cfg.items()}
    return block_d, cfg


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class _MMCAFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, kind, scale, block_m, block_n, need_grad):
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        bd, cfg = _configs(d, block_m, block_n)
        prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32: exact dots; ignored for 16-bit inputs
        out = torch.empty(b, hq, lq, d, dtype=q.dtype, device=q.device)
        if need_grad:
            o_img = torch.empty_like(out)
            lse_t = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
            lse_i = torch.empty_like(lse_t)
        else:  # inference: nothing is saved (STORE_OI=False skips those stores; the pointers are unused)
            o_img = lse_t = lse_i = out
        bm, bn, warps, stages = cfg["fwd"]
        _mmca_fwd[(triton.cdiv(lq, bm), b * hq)](
            q, k, v, kind, out, o_img, lse_t, lse_i,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], kind.stride(0),
            hq, hq // hkv, lq, lk, d, scale * _LOG2E,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=prec, STORE_OI=need_grad, num_warps=warps, num_stages=stages)
        if need_grad:
            ctx.save_for_backward(q, k, v, kind, out, o_img, lse_t, lse_i)
            ctx.cfg = (scale, bd, cfg, prec)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, kind, out, o_img, lse_t, lse_i = ctx.saved_tensors
        scale, bd, cfg, prec = ctx.cfg
        b, hq, lq, d = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        do = _last_dim_contiguous(do)
        # per-term softmax Jacobian rows: D_x = rowsum(dO * O_x), with O_text = O - O_image (O(N) memory)
        dof = do.float()
        d_i = (dof * o_img.float()).sum(-1)
        d_t = ((dof * out.float()).sum(-1) - d_i).contiguous()  # [B, Hq, Lq]: the kernels index them flat
        d_i = d_i.contiguous()  # (dO may be a transposed view, e.g. from HF's [B, L, H, D] layout)
        dq = torch.empty(b, hq, lq, d, dtype=q.dtype, device=q.device)
        dk = torch.empty(b, hkv, lk, d, dtype=k.dtype, device=k.device)
        dv = torch.empty(b, hkv, lk, d, dtype=v.dtype, device=v.device)
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], kind.stride(0))
        bm, bn, warps, stages = cfg["dkdv"]
        _mmca_bwd_dkdv[(triton.cdiv(lk, bn), b * hkv)](
            q, k, v, kind, do, lse_t, lse_i, d_t, d_i, dk, dv, *strides,
            hq, hkv, hq // hkv, lq, lk, d, scale * _LOG2E, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=prec, num_warps=warps, num_stages=stages)
        bm, bn, warps, stages = cfg["dq"]
        _mmca_bwd_dq[(triton.cdiv(lq, bm), b * hq)](
            q, k, v, kind, do, lse_t, lse_i, d_t, d_i, dq, *strides,
            hq, hq // hkv, lq, lk, d, scale * _LOG2E, scale,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, PREC=prec, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None, None, None, None


def mmca_attention_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_is_image: torch.Tensor,
                          key_padding_mask: torch.Tensor | None = None, scale: float | None = None, *,
                          block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """MMCA with the fused Triton kernels; same contract as ``mmca_attention(..., mode="mmca")``:
    query ``[B, Hq, Lq, D]``, key/value ``[B, Hkv, Lk, D]``, key_is_image / key_padding_mask ``[B, Lk]``
    bool (True = image / real token); returns ``[B, Hq, Lq, D]`` (padded query rows are 0).
    Differentiable in query, key and value. ``block_m``/``block_n`` override the tile sizes."""
    if triton is None:
        raise RuntimeError("mmca_attention_triton needs triton (pip install triton)")
    check_shapes(query, key, value, key_is_image, key_padding_mask)
    b, hq, lq, d = query.shape
    if value.shape != key.shape or key.shape[-1] != d:
        raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} disagree")
    if query.dtype not in DTYPES or key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(f"dtypes {query.dtype}/{key.dtype}/{value.dtype}: expected one of {DTYPES}, all equal")
    if d > MAX_HEAD_DIM:
        raise ValueError(f"head dim {d} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk is not None and (blk < 16 or blk & (blk - 1)):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if not INTERPRETED and query.device.type != "cuda":
        raise ValueError("the Triton MMCA kernel needs CUDA tensors (or TRITON_INTERPRET=1 when this module "
                         "is first imported, for triton's CPU interpreter)")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    # one byte per token: 0 = padding (no key, query row -> 0), 1 = text, 2 = image
    kind = key_is_image.to(device=query.device, dtype=torch.int8) + 1
    if key_padding_mask is not None:
        kind = kind * key_padding_mask.to(device=query.device, dtype=torch.int8)
    kind = kind.contiguous()
    query, key, value = (_last_dim_contiguous(x) for x in (query, key, value))
    need_grad = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return _MMCAFunction.apply(query, key, value, kind, float(scale), block_m, block_n, need_grad)
