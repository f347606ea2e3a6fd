"""A lean forward for one decode step of a LLaMA-architecture LM (the embedded default).

A decode step feeds one token through every layer; on a CPU with a small model much of its time is
Python and small-op overhead around the matmuls (transformers' module calls, an RMSNorm of six ops, a
rotary embedding built from slices and a ``cat``). :class:`LeanDecoder` runs the same computation
with the same modules and weights in fewer operations: ``F.rms_norm``, the rotary embedding as
``x * cos + roll(x) * sin`` (``roll`` by half the head is ``rotate_half`` up to the sign, which is
folded into ``sin``), a KV append into a buffer with room to grow (:func:`append_kv`; transformers'
``DynamicLayer`` copies the whole layer per token), and :func:`visualchat.attention.mmca_attention`
(whose one-query branch is the compact MMCA decode). The logits equal the transformers path's to
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


def append_kv(cache, i: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cache.update(k, v, i)`` for one new token, without copying the whole layer each step (a
    ``DynamicLayer`` concatenates: O(context) bytes per token per layer). The layer's keys and values
    become prefix views of a buffer with room to grow; a crop (undo, regenerate) leaves them prefix
    views, so the buffer is reused, and anything else that replaced them (a prefill's concatenation)
    gets a new buffer. Other cache layers go through ``cache.update``."""
    from transformers.cache_utils import DynamicLayer

    layer = cache.layers[i] if i < len(cache.layers) else None
    if (type(layer) is not DynamicLayer or getattr(cache, "offloading", False) or not layer.is_initialized
            or layer.keys.dim() != 4 or layer.keys.shape[-2] == 0):
        return cache.update(k, v, i)
    keys, vals = layer.keys, layer.values
    n = keys.shape[-2]
    buf = getattr(layer, "_vc_buffer", None)
    if (buf is None or buf[0].shape[-2] <= n or keys.data_ptr() != buf[0].data_ptr()
            or vals.data_ptr() != buf[1].data_ptr() or keys.stride() != buf[0].stride()
            or vals.stride() != buf[1].stride()):
        cap = n + max(64, n // 2)
        kb = keys.new_empty((*keys.shape[:-2], cap, keys.shape[-1]))
        vb = vals.new_empty((*vals.shape[:-2], cap, vals.shape[-1]))
        kb[..., :n, :] = keys
        vb[..., :n, :] = vals
        buf = layer._vc_buffer = (kb, vb)
    kb, vb = buf
    kb[..., n:n + 1, :] = k
    vb[..., n:n + 1, :] = v
    layer.keys, layer.values = kb[..., :n + 1, :], vb[..., :n + 1, :]
    return layer.keys, layer.values


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


class LeanDecoder:
    """``step(token, cache, key_is_image)`` -> float32 logits ``[V]`` for one new text token.

    Per layer: one RMSNorm, one GEMM for q/k/v (a :class:`visualchat.lowp.Fused` matrix where the LM
    was converted; else the three layers and a ``cat``), the rotary embedding of q and k as one small
    matmul with a 64 x 64 rotation built once per step, the KV append, MMCA's two masked softmaxes over
    one score matrix (masks built once per step), ``o_proj``, one RMSNorm, one GEMM for gate/up, SiLU,
    ``down_proj``: about 20 tensor operations where transformers' layer takes about 60."""

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
            self.layers.append((layer.input_layernorm.weight, qkv, at.o_proj,
                                getattr(at, "scaling", self.head_dim ** -0.5),
                                layer.post_attention_layernorm.weight, gate_up, mlp.down_proj))
        # the rotary embedding as out = x @ R: R[j, j] = cos_j, and rotate_half's terms off the diagonal
        d, half = self.head_dim, self.head_dim // 2
        j = torch.arange(d)
        self._rot_src = torch.cat([j[half:], j[:half]])  # out_j takes x[src_j] * (-sin_j or +sin_j)
        self._rot_sign = torch.cat([-torch.ones(half), torch.ones(half)])
        self._diag = j
        #: None, or ``tick(section)`` called as each section of a step ends (bench/default_model.py
        #: --profile times the sections with it); costs one test per section when None.
        self.tick = None

    def _rotation(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """``[D, D]``: ``v @ R`` is the rotary embedding of a ``[.., D]`` vector at position ``pos``."""
        cos, sin = self.dec.rotary_emb(x, torch.tensor([[pos]], device=x.device))  # [1, 1, D] each
        cos, sin = cos.view(-1).to(x.dtype), sin.view(-1).to(x.dtype)
        dev = x.device
        r = torch.zeros(self.head_dim, self.head_dim, dtype=x.dtype, device=dev)
        r[self._diag.to(dev), self._diag.to(dev)] = cos
        r[self._rot_src.to(dev), self._diag.to(dev)] = sin * self._rot_sign.to(dev, x.dtype)
        return r

    @torch.no_grad()
    def step(self, token: int, cache, key_is_image: torch.Tensor) -> torch.Tensor:
        m, tick = self.model, self.tick
        dev = m.embed_tokens.weight.device
        x = m.embed_tokens(torch.tensor([[token]], device=dev))  # [1, 1, H]: a text token's row of the embedding copy
        rot = self._rotation(x, cache.get_seq_length())
        mode = m.attention_mode
        plan = attention._decode_masks(key_is_image) if mode == "mmca" else "causal"
        nh, nkv, d, hsz = self.n_heads, self.n_kv, self.head_dim, (self.hidden,)
        g, nq = nh // nkv, nh * d
        if tick:
            tick("step setup (embedding row, rotation, MMCA masks)")
        for i, (w1, qkv_proj, o_proj, scaling, w2, gate_up, down) in enumerate(self.layers):
            h = F.rms_norm(x, hsz, w1, self.eps)
            if tick:
                tick("RMSNorm")
            qkv = qkv_proj(h) if not isinstance(qkv_proj, tuple) else torch.cat([f(h) for f in qkv_proj], -1)
            if tick:
                tick("GEMM q/k/v")
            qk = torch.matmul(qkv[0, :, :nq + nkv * d].view(nh + nkv, d), rot)  # q and k rotated: [nh + nkv, D]
            k = qk[nh:].view(1, nkv, 1, d)
            v = qkv[0, :, nq + nkv * d:].view(1, nkv, 1, d)
            if tick:
                tick("rotary embedding")
            k, v = append_kv(cache, i, k, v)  # [1, nkv, L, D]
            if tick:
                tick("KV cache append")
            if plan is None or isinstance(plan, str):  # text keys only, causal mode, or not the branch's case
                a = attention.mmca_attention(qk[:nh].view(1, nh, 1, d), k, v, key_is_image, None, scaling, mode)
            else:  # MMCA: the text-key and image-key softmaxes over one score matrix, added
                scores = torch.matmul(qk[:nh].view(nkv, g, d), k[0].transpose(-1, -2))  # [nkv, g, L]
                probs = torch.softmax(torch.add(plan[:, 0], scores, alpha=scaling), dim=-1)  # [2, nkv, g, L]
                a = torch.matmul(probs.sum(0), v[0])  # [nkv, g, D]
            if tick:
                tick("attention (MMCA)")
            y = o_proj(a.view(1, 1, nq))
            if tick:
                tick("GEMM o")
            x = x + y
            h = F.rms_norm(x, hsz, w2, self.eps)
            if tick:
                tick("RMSNorm")
            gu = gate_up(h) if not isinstance(gate_up, tuple) else torch.cat([f(h) for f in gate_up], -1)
            if tick:
                tick("GEMM gate/up")
            n_int = gu.shape[-1] // 2
            y = F.silu(gu[..., :n_int]) * gu[..., n_int:]
            if tick:
                tick("SiLU x up, residual adds")
            y = down(y)
            if tick:
                tick("GEMM down")
            x = x + y
            if tick:
                tick("SiLU x up, residual adds")
        x = F.rms_norm(x, hsz, self.dec.norm.weight, self.eps)
        if tick:
            tick("RMSNorm")
        logits = self.head(x)[0, -1].float()
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
