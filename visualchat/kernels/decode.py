"""A lean forward for one decode step of a LLaMA-architecture LM (the embedded default).

A decode step feeds one token through every layer; on a CPU with a small model much of its time is
Python and small-op overhead around the matmuls (transformers' module calls, an RMSNorm of six ops, a
rotary embedding built from slices and a ``cat``, a KV cache that concatenates). :class:`LeanDecoder`
runs the same computation with the same weights in fewer operations: RMSNorm as a dot product and an
``addcmul``, the rotary embedding as ``rows * C + flip(rows) * S`` over all q/k/v rows at once (swapping
the halves of a head is ``rotate_half`` up to the sign, which is folded into ``S``; the attention scale
into q's rows; the tables of every position built once per decode state), the new k and v written into
the step's own per-layer buffers (keys kept transposed, room to grow; the cache's layers get views of
them, transformers' ``DynamicLayer`` would copy the whole layer per token), fbgemm's fp16 GEMM called on
its packed weight directly, MMCA's one-query case as two masked softmaxes over one score matrix (masks
kept per state, one entry changed per step). The logits equal the transformers path's to float32
rounding (tests/test_lowp.py).

It is used for a session's decode steps when the LM is a plain ``llama`` model (no rope scaling
other than what the rotary module computes, SiLU MLP), the attention is ``mmca`` or ``causal``, the
cache is a plain batch-1 ``DynamicCache``, the process is not one rank of several (ranks > 0 replay
rank 0's ``model.forward`` calls), and ``VISUALCHAT_DECODE`` is not ``hf`` (the choice is made by
:func:`visualchat.kernels.lean_decoder`). Everything else (prefill, training, other architectures) goes
through transformers as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def unsupported_reason(model) -> str | None:
    """None when :class:`LeanDecoder` can run ``model`` (a VisualChatModel), else why not."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return "several ranks (the other ranks follow model.forward)"
    if getattr(model, "attention_mode", None) not in ("mmca", "causal"):
        return f"attention mode {getattr(model, 'attention_mode', None)!r}"
    lm = model.lm
    cfg = lm.config
    if getattr(cfg, "model_type", None) != "llama":
        return f"model_type {getattr(cfg, 'model_type', None)!r} (only llama)"
    if getattr(cfg, "hidden_act", None) != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return "not a plain SiLU LLaMA MLP"
    dec = lm.get_decoder()
    for name in ("layers", "norm", "rotary_emb"):
        if not hasattr(dec, name):
            return f"the decoder has no {name}"
    for layer in dec.layers:
        at, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if at is None or mlp is None or not all(hasattr(at, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without the LLaMA projections"
        if any(hasattr(getattr(at, n), "base_layer") for n in ("q_proj", "v_proj")):
            return "LoRA adapters on the attention"
    return None


#: Positions of room a rebuilt decode state leaves for new tokens (rounded up to a multiple of it).
ROOM = 128


class _State:
    """The lean step's own copy of one cache's keys and values, built from the cache (after a prefill,
    a crop, or when its room is used up) and kept in step with it. Per layer: the keys transposed in
    ``kt [Hkv, D, cap]`` and the values in ``v [Hkv, cap, D]`` (zeros beyond the ``n`` positions held),
    so that a new position is one ``index_copy_`` into each and the attention reads their first
    ``n + 1`` positions as they lie; the cache's layer gets prefix views of them after each step
    (``published``: transformers' next prefill or crop works on those). Also per state: the additive
    masks of the attention terms over all ``cap`` positions (``-inf`` beyond ``n``; built for the
    model's attention mode, which is fixed when the model is built), the rotary tables of positions
    ``0..cap``, and the step's scratch tensors. One state per cache, so two sessions never share
    scratch."""

    def __init__(self, lean, cache, key_is_image, n: int):
        nkv, d, g = lean.n_kv, lean.head_dim, lean.n_heads // lean.n_kv
        rows = lean.n_heads + 2 * nkv  # q's, k's and v's rows of a head's width
        first = cache.layers[0].keys
        dev, dt = first.device, first.dtype
        self.n = n
        self.cap = cap = -(-(n + ROOM) // ROOM) * ROOM
        self.kt, self.v, self.full, self.published = [], [], [], []
        for layer in cache.layers:
            kt = torch.zeros(nkv, d, cap, device=dev, dtype=dt)
            v = torch.zeros(nkv, cap, d, device=dev, dtype=dt)
            kt[:, :, :n].copy_(layer.keys[0].transpose(1, 2))
            v[:, :n].copy_(layer.values[0])
            self.kt.append(kt)
            self.v.append(v)
            self.full.append((kt.transpose(1, 2)[None], v[None]))  # [1, Hkv, cap, D] views
            self.published.append((layer.keys, layer.values))  # what the cache's layer holds now
        # the masks: text keys (and the query itself) in the first term; image keys, all earlier than
        # any text query, in the second (MMCA with images only); -inf for positions not yet written
        is_img = torch.zeros(cap, dtype=torch.bool, device=dev)
        is_img[:n] = torch.as_tensor(key_is_image, device=dev).view(-1)[:n].bool()
        filled = torch.arange(cap, device=dev) < n
        zero, ninf = torch.zeros((), device=dev, dtype=dt), torch.full((), float("-inf"), device=dev, dtype=dt)
        if lean.model.attention_mode == "mmca" and bool(is_img.any()):
            self.mask = torch.stack([torch.where(filled & ~is_img, zero, ninf),
                                     torch.where(filled & is_img, zero, ninf)]).view(2, 1, 1, cap)
        else:  # causal attention, or MMCA with no image: one softmax over every key
            self.mask = torch.where(filled, zero, ninf).view(1, 1, cap)
        self.text_mask = self.mask.view(-1, cap)[0]  # where each new (text) position is unmasked
        self.tables = lean._rotary_tables(cap, dev, dt)  # {scaling: (C, S)}, [cap, rows, 2, D/2] each
        # scratch: the rotated q/k/v rows (q's, k's and v's views for the attention), the attention output
        self.rot = torch.empty(rows, d, device=dev, dtype=dt)
        nh = lean.n_heads
        self.rot3 = self.rot.view(rows, 2, d // 2)
        self.q = self.rot[:nh].view(nkv, g, d)
        self.k = self.rot[nh:nh + nkv].view(nkv, d, 1)
        self.vrow = self.rot[nh + nkv:].view(nkv, 1, d)
        self.att = torch.empty(nkv, g, d, device=dev, dtype=dt)
        self.att_row = self.att.view(1, nh * d)
        self.zero = torch.zeros(1, lean.hidden, device=dev, dtype=dt)

    def in_step_with(self, cache) -> bool:
        """Whether the cache still holds what this state last gave it, with room for one more token."""
        if self.n >= self.cap or len(cache.layers) != len(self.kt):
            return False
        return all(layer.keys is p[0] and layer.values is p[1] for layer, p in zip(cache.layers, self.published))


def _plain_cache_length(cache) -> int | None:
    """The length of ``cache`` when every layer is a plain, non-empty, batch-1 :class:`DynamicLayer`
    with 4-d keys of one shape and dtype (what :class:`_State` copies); else None."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "offloading", False):
        return None
    shape = dtype = None
    for layer in layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4:
            return None
        if shape is None:
            shape, dtype = layer.keys.shape, layer.keys.dtype
        if layer.keys.shape != shape or layer.values.shape != shape or shape[0] != 1 or shape[2] == 0 \
                or layer.keys.dtype != dtype or layer.values.dtype != dtype:
            return None
    return shape[2]


def _gemm_fn(mods):
    """A callable ``f(h [1, in]) -> [1, out]`` for one linear layer, a :class:`visualchat.kernels.lowp.Fused`
    group, or a tuple of layers (outputs side by side). fbgemm fp16 layers are called as torch's op
    on their packed weight directly (no module call, no dtype checks: the step's input is float32)."""
    from .lowp import CLASSES, Fused

    if isinstance(mods, tuple):
        fns = [_gemm_fn(m) for m in mods]
        return lambda h: torch.cat([f(h) for f in fns], -1)
    lin = mods.linear if isinstance(mods, Fused) else mods
    if type(lin) is CLASSES["fp16"]:
        op, packed = torch.ops.quantized.linear_dynamic_fp16.default, lin.packed
        return lambda h: op(h, packed)
    return mods


class LeanDecoder:
    """``step(token, cache, key_is_image)`` -> float32 logits ``[V]`` for one new text token.

    Per layer: RMSNorm as one dot product and one ``addcmul`` (``F.rms_norm`` is several kernels on
    CPU), one GEMM for q/k/v (a :class:`visualchat.kernels.lowp.Fused` matrix where the LM was converted;
    else the three layers and a ``cat``; fbgemm's op called directly), the rotary embedding of q and k
    as ``rows * C + flip(rows) * S`` over all q/k/v rows at once into a scratch tensor whose q, k and v
    views are made once per state, the new k and v appended with one ``index_copy_`` each, MMCA's two
    masked softmaxes over one score matrix, ``o_proj``, RMSNorm, one GEMM for gate/up, SiLU,
    ``down_proj``: about 25 tensor operations where transformers' layer takes about 60. The step's
    buffers, masks, tables and scratch live in a :class:`_State` per cache."""

    def __init__(self, model):
        from .lowp import fused_group

        self.model = model  # (lean_decoder rebuilds this when the LM's weight format changes)
        lm = model.lm
        self.dec = lm.get_decoder()
        self.head = lm.get_output_embeddings()
        cfg = lm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.layers = []
        for layer in self.dec.layers:
            at, mlp = layer.self_attn, layer.mlp
            qkv = fused_group(at.q_proj, at.k_proj, at.v_proj) or (at.q_proj, at.k_proj, at.v_proj)
            gate_up = fused_group(mlp.gate_proj, mlp.up_proj) or (mlp.gate_proj, mlp.up_proj)
            self.layers.append((layer.input_layernorm.weight, _gemm_fn(qkv), _gemm_fn(at.o_proj),
                                float(getattr(at, "scaling", self.head_dim ** -0.5)),
                                layer.post_attention_layernorm.weight, _gemm_fn(gate_up), _gemm_fn(mlp.down_proj)))
        self.head_fn = _gemm_fn(self.head)
        half = self.head_dim // 2
        self._sign = torch.cat([-torch.ones(half), torch.ones(half)])  # rotate_half = sign * roll(x, half)
        #: None, or ``tick(section)`` called as each section of a step ends (bench/default_model.py
        #: --profile times the sections with it); costs one test per section when None.
        self.tick = None

    def _rotary_tables(self, cap: int, dev, dtype) -> dict:
        """``{scaling: (C, S)}``, ``[cap, Hq + 2 Hkv, 2, D/2]`` each: at position ``p``,
        ``rows * C[p] + flip(rows) * S[p]`` (rows viewed as ``[rows, 2, D/2]``, ``flip`` swapping the
        halves: ``rotate_half`` up to the sign, folded into ``S``) is the rotary embedding of q's rows
        (times the attention scale) and k's, and v's rows as they are."""
        pos = torch.arange(cap, device=dev)[None]
        probe = torch.zeros(1, 1, self.hidden, device=dev, dtype=dtype)
        cos, sin = self.dec.rotary_emb(probe, pos)  # [1, cap, D] each
        cos, sin = cos[0].to(dtype), sin[0].to(dtype) * self._sign.to(dev, dtype)
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        one, zero = cos.new_ones(cap, nkv, d), cos.new_zeros(cap, nkv, d)
        out = {}
        for scaling in {lay[3] for lay in self.layers}:
            c = torch.cat([(cos * scaling)[:, None].expand(cap, nh, d), cos[:, None].expand(cap, nkv, d), one], 1)
            s = torch.cat([(sin * scaling)[:, None].expand(cap, nh, d), sin[:, None].expand(cap, nkv, d), zero], 1)
            out[scaling] = (c.view(cap, -1, 2, d // 2), s.view(cap, -1, 2, d // 2))
        return out

    def state(self, cache, key_is_image) -> _State | None:
        """The decode state of ``cache`` (its keys and values in this step's buffers), rebuilt when the
        cache changed since the last step (a prefill, a crop) or its room is used up; None when the cache
        is not one this step can drive (then the caller runs transformers' forward).
        ``key_is_image``: one bool per position of the cache, the new token's included (a list or tensor;
        read only when the state is rebuilt)."""
        st = getattr(cache, "_vc_lean", None)
        if st is not None and st.owner is self and st.in_step_with(cache):
            return st
        n = _plain_cache_length(cache)
        if n is None:
            return None
        st = _State(self, cache, key_is_image, n)
        st.owner = self
        cache._vc_lean = st
        return st

    @torch.no_grad()
    def step(self, token: int, cache, key_is_image) -> torch.Tensor | None:
        """Feed one text token: float32 logits ``[V]``, the token's keys and values added to ``cache``;
        None (nothing done) where ``cache`` is not one this step can drive."""
        st = self.state(cache, key_is_image)
        if st is None:
            return None
        m, tick = self.model, self.tick
        n = st.n
        # the residual stream [1, H], changed in place below (a fresh copy of a text token's embedding row)
        emb = m.embed_tokens
        if type(emb) is torch.nn.Embedding:
            x = emb.weight[token].clone().view(1, -1)
        else:
            x = emb(torch.tensor([token], device=st.zero.device)).view(1, -1).clone()
        xv, zero = x.view(-1), st.zero
        hsz, eps = self.hidden, self.eps
        tables = {sc: (c[n], s[n]) for sc, (c, s) in st.tables.items()}
        st.text_mask[n] = 0.0  # the new text position: a key of the text term (it attends to itself)
        at = torch.tensor([n], device=zero.device)
        two_terms = st.mask.dim() == 4
        mask = st.mask.narrow(-1, 0, n + 1)
        rot3 = st.rot3
        if tick:
            tick("step setup (embedding row, rotary tables, MMCA masks)")
        for i, (w1, qkv_proj, o_proj, scaling, w2, gate_up, down) in enumerate(self.layers):
            h = torch.addcmul(zero, x, w1, value=(float(torch.dot(xv, xv)) / hsz + eps) ** -0.5)
            if tick:
                tick("RMSNorm")
            qkv = qkv_proj(h)
            if tick:
                tick("GEMM q/k/v")
            c, s = tables[scaling]
            r = qkv.view(rot3.shape)
            torch.addcmul(torch.mul(r, c), r.flip(1), s, out=rot3)  # q (scaled) and k rotated, v as it was
            if tick:
                tick("rotary embedding")
            kt, vb = st.kt[i], st.v[i]
            kt.index_copy_(2, at, st.k)
            vb.index_copy_(1, at, st.vrow)
            kf, vf = st.full[i]
            layer = cache.layers[i]
            layer.keys, layer.values = kf.narrow(2, 0, n + 1), vf.narrow(2, 0, n + 1)
            st.published[i] = (layer.keys, layer.values)
            if tick:
                tick("KV cache append")
            # MMCA: the text-key and image-key softmaxes over one score matrix, added (or one softmax);
            # over the n + 1 positions held (the keys and values are read from memory: no more of them)
            scores = torch.bmm(st.q, kt.narrow(2, 0, n + 1))  # [Hkv, g, n + 1]; the scale is in q
            probs = torch.softmax(torch.add(mask, scores) if two_terms else scores.add_(mask), dim=-1)
            torch.bmm(probs.sum(0) if two_terms else probs, vb.narrow(1, 0, n + 1), out=st.att)  # [Hkv, g, D]
            if tick:
                tick("attention (MMCA)")
            y = o_proj(st.att_row)
            if tick:
                tick("GEMM o")
            x.add_(y)
            h = torch.addcmul(zero, x, w2, value=(float(torch.dot(xv, xv)) / hsz + eps) ** -0.5)
            if tick:
                tick("RMSNorm")
            gu = gate_up(h)
            if tick:
                tick("GEMM gate/up")
            n_int = gu.shape[-1] // 2
            y = F.silu(gu.narrow(1, 0, n_int)).mul_(gu.narrow(1, n_int, n_int))
            if tick:
                tick("SiLU x up, residual adds")
            y = down(y)
            if tick:
                tick("GEMM down")
            x.add_(y)
            if tick:
                tick("SiLU x up, residual adds")
        st.n = n + 1
        h = torch.addcmul(zero, x, self.dec.norm.weight, value=(float(torch.dot(xv, xv)) / hsz + eps) ** -0.5)
        if tick:
            tick("RMSNorm")
        logits = self.head_fn(h)
        logits = logits.view(-1).float()
        if tick:
            tick("GEMM head (logits)")
        return logits
