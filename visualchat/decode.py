"""A lean forward for one decode step of a LLaMA-architecture LM (the embedded default).

A decode step feeds one token through every layer; on a CPU with a small model much of its time is
Python and small-op overhead around the matmuls (transformers' module calls, an RMSNorm of six ops, a
rotary embedding built from slices and a ``cat``, a KV cache that concatenates). :class:`LeanDecoder`
runs the same computation with the same weights in fewer operations: RMSNorm as a dot product and an
``addcmul``, the rotary embedding as ``rows * C + roll(rows) * S`` (``roll`` by half the head is
``rotate_half`` up to the sign, which is folded into ``S``; the attention scale into q's rows), the
new k and v copied into a per-layer buffer with room to grow (transformers' ``DynamicLayer`` copies
the whole layer per token), fbgemm's fp16 GEMM called on its packed weight directly, MMCA's one-query
case as two masked softmaxes over one score matrix. The logits equal the transformers path's to
float32 rounding (tests/test_lowp.py).

It is used for a session's decode steps when the LM is a plain ``llama`` model (no rope scaling
other than what the rotary module computes, SiLU MLP), the process is not one rank of several
(ranks > 0 replay rank 0's ``model.forward`` calls), and ``VISUALCHAT_DECODE`` is not ``hf``
(``hf`` also turns off MMCA's one-query branch: the decode path as it was before, for comparisons).
Everything else (prefill, training, other architectures) goes through transformers as before.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import attention


def unsupported_reason(model) -> str | None:
    """None when :class:`LeanDecoder` can run ``model`` (a VisualChatModel), else why not."""
    if os.environ.get("VISUALCHAT_DECODE", "").lower() == "hf":
        return "VISUALCHAT_DECODE=hf"
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        return "several ranks (the other ranks follow model.forward)"
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


def _kv_state(cache, i: int):
    """``(buffer, n)`` for layer ``i`` of ``cache``: ``buffer [2, B, Hkv, capacity, D]`` holds the
    layer's keys (``buffer[0]``) and values (``buffer[1]``) in its first ``n`` positions, with room
    for one more; or None where the layer is not a plain :class:`DynamicLayer` (then the caller goes
    through ``cache.update``). The layer's keys and values are prefix views of the buffer (set by
    :func:`_kv_commit`); a crop (undo, regenerate) leaves them so and the buffer is reused, anything
    else that replaced them (a prefill's concatenation) gets a new buffer, the context copied once."""
    from transformers.cache_utils import DynamicLayer

    layer = cache.layers[i] if i < len(cache.layers) else None
    st = getattr(layer, "_vc_kv", None)
    if st is not None and layer.keys is st[3] and layer.values is st[4]:  # as the last step left it
        n = st[3].shape[-2]
        if n < st[0].shape[3]:
            return st[0], n
    if (type(layer) is not DynamicLayer or getattr(cache, "offloading", False) or not layer.is_initialized
            or layer.keys.dim() != 4 or layer.keys.shape[-2] == 0):
        return None
    keys, vals = layer.keys, layer.values
    n = keys.shape[-2]
    if (st is None or st[0].shape[3] <= n or keys.shape != vals.shape or st[1].shape[:-2] != keys.shape[:-2]
            or st[1].shape[-1] != keys.shape[-1] or st[1].dtype != keys.dtype
            or keys.data_ptr() != st[1].data_ptr() or vals.data_ptr() != st[2].data_ptr()
            or keys.stride() != st[1].stride() or vals.stride() != st[2].stride()):
        cap = n + max(64, n // 2)
        buf = keys.new_empty((2, *keys.shape[:-2], cap, keys.shape[-1]))
        buf[0, ..., :n, :] = keys
        buf[1, ..., :n, :] = vals
        st = (buf, buf[0], buf[1], None, None)
    layer._vc_kv = st
    return st[0], n


def _kv_commit(cache, i: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """After position ``n`` of layer ``i``'s buffer was written: the layer's keys and values become
    its first ``n + 1`` positions (views); returns them."""
    layer = cache.layers[i]
    buf, kb, vb = layer._vc_kv[:3]
    layer.keys, layer.values = kb[..., :n + 1, :], vb[..., :n + 1, :]
    layer._vc_kv = (buf, kb, vb, layer.keys, layer.values)
    return layer.keys, layer.values


def _gemm_fn(mods):
    """A callable ``f(h [1, in]) -> [1, out]`` for one linear layer, a :class:`visualchat.lowp.Fused`
    group, or a tuple of layers (outputs side by side). fbgemm fp16 layers are called as torch's op
    on their packed weight directly (no module call, no dtype checks: the step's input is float32)."""
    from .lowp import Fused, _Fp16

    if isinstance(mods, tuple):
        fns = [_gemm_fn(m) for m in mods]
        return lambda h: torch.cat([f(h) for f in fns], -1)
    lin = mods.linear if isinstance(mods, Fused) else mods
    if type(lin) is _Fp16:
        op, packed = torch.ops.quantized.linear_dynamic_fp16.default, lin.packed
        return lambda h: op(h, packed)
    return mods


class LeanDecoder:
    """``step(token, cache, key_is_image)`` -> float32 logits ``[V]`` for one new text token.

    Per layer: RMSNorm as one dot product and one ``addcmul`` (``F.rms_norm`` is several kernels on
    CPU), one GEMM for q/k/v (a :class:`visualchat.lowp.Fused` matrix where the LM was converted;
    else the three layers and a ``cat``; fbgemm's op called directly), the rotary embedding of q and k
    as ``rows * C + roll(rows) * S`` over all q/k/v rows at once (tables built once per step: the
    attention scale folded into q's rows, 1 and 0 for v's), one copy of the new k and v into the
    layer's KV buffer (keys and values in one tensor with room to grow), MMCA's two masked softmaxes
    over one score matrix (masks built once per step), ``o_proj``, RMSNorm, one GEMM for gate/up,
    SiLU, ``down_proj``: about 20 tensor operations where transformers' layer takes about 60."""

    def __init__(self, model):
        from .lowp import fused_group, lm_format

        self.model = model
        lm = model.lm
        self.weights = lm_format(lm)  # the modules below are the LM's current linear layers
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

    def _rotary_tables(self, x: torch.Tensor, pos: int) -> dict:
        """``{scaling: (C, S)}``, ``[Hq + 2 Hkv, D]`` each: ``rows * C + roll(rows, D/2) * S`` is the
        rotary embedding at ``pos`` of q's rows (times the attention scale) and k's, and v's rows as
        they are."""
        cos, sin = self.dec.rotary_emb(x.view(1, 1, -1), torch.tensor([[pos]], device=x.device))  # [1, 1, D] each
        cos, sin = cos.view(1, -1).to(x.dtype), (sin.view(-1).to(x.dtype) * self._sign.to(x.device, x.dtype)).view(1, -1)
        nh, nkv, d = self.n_heads, self.n_kv, self.head_dim
        one, zero = cos.new_ones(nkv, d), cos.new_zeros(nkv, d)
        out = {}
        for scaling in {lay[3] for lay in self.layers}:
            c = torch.cat([(cos * scaling).expand(nh, d), cos.expand(nkv, d), one])
            s = torch.cat([(sin * scaling).expand(nh, d), sin.expand(nkv, d), zero])
            out[scaling] = (c, s)
        return out

    @torch.no_grad()
    def step(self, token: int, cache, key_is_image: torch.Tensor) -> torch.Tensor:
        m, tick = self.model, self.tick
        dev = m.embed_tokens.weight.device
        # the residual stream [1, H], changed in place below (a fresh copy of a text token's embedding row)
        x = m.embed_tokens(torch.tensor([token], device=dev)).view(1, -1).clone()
        xv = x.view(-1)
        zero = torch.zeros_like(x)
        hsz, eps = self.hidden, self.eps
        tables = self._rotary_tables(x, cache.get_seq_length())
        mode = m.attention_mode
        plan = attention._decode_masks(key_is_image) if mode == "mmca" else "causal"
        if plan is not None and not isinstance(plan, str):
            plan = plan[:, 0]  # [2, 1, 1, L]: added to scores [Hkv, g, L]
        nh, nkv, d, half = self.n_heads, self.n_kv, self.head_dim, self.head_dim // 2
        g, nq, rows = nh // nkv, nh * d, nh + 2 * nkv
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
            r = qkv.view(rows, d)
            r = torch.addcmul(r * c, r.roll(half, -1), s)  # q (scaled) and k rotated, v as it was: [rows, D]
            if tick:
                tick("rotary embedding")
            slot = _kv_state(cache, i)
            if slot is not None:
                buf, n = slot
                buf.select(3, n).copy_(r[nh:].view(buf.shape[0], buf.shape[1], nkv, d))
                k, v = _kv_commit(cache, i, n)
            else:
                kv = r[nh:].view(2, 1, nkv, 1, d)
                k, v = cache.update(kv[0], kv[1], i)
            if tick:
                tick("KV cache append")
            q = r[:nh]
            if plan is None or mode not in ("mmca", "causal"):  # not the one-query cases below: the general path
                a = attention.mmca_attention(q.view(1, nh, 1, d), k, v, key_is_image, None, 1.0, mode)
            else:
                scores = torch.matmul(q.view(nkv, g, d), k[0].transpose(-1, -2))  # [Hkv, g, L] (scale in q)
                if isinstance(plan, str):  # text keys only, or causal mode: one softmax over all keys
                    probs = torch.softmax(scores, dim=-1)
                else:  # MMCA: the text-key and image-key softmaxes over one score matrix, added
                    probs = torch.softmax(torch.add(plan, scores), dim=-1).sum(0)
                a = torch.matmul(probs, v[0])  # [Hkv, g, D]
            if tick:
                tick("attention (MMCA)")
            y = o_proj(a.view(1, nq))
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
            y = F.silu(gu[:, :n_int]).mul_(gu[:, n_int:])
            if tick:
                tick("SiLU x up, residual adds")
            y = down(y)
            if tick:
                tick("GEMM down")
            x.add_(y)
            if tick:
                tick("SiLU x up, residual adds")
        h = torch.addcmul(zero, x, self.dec.norm.weight, value=(float(torch.dot(xv, xv)) / hsz + eps) ** -0.5)
        if tick:
            tick("RMSNorm")
        logits = self.head_fn(h)
        logits = logits.view(-1).float()
        if tick:
            tick("GEMM head (logits)")
        return logits


def lean_decoder(vc) -> LeanDecoder | None:
    """The LeanDecoder for ``vc`` (built once, kept on it), or None where it does not apply."""
    if unsupported_reason(vc.model) is not None:
        return None
    from .lowp import lm_format

    lean = getattr(vc, "_lean_decoder", None)
    if lean is None or lean.model is not vc.model or lean.weights != lm_format(vc.model.lm):
        lean = vc._lean_decoder = LeanDecoder(vc.model)
    return lean
