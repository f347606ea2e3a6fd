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
    """``step(token, cache, key_is_image)`` -> float32 logits ``[V]`` for one new text token."""

    def __init__(self, model):
        from .lowp import lm_format

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
        for i, layer in enumerate(self.dec.layers):
            at, mlp = layer.self_attn, layer.mlp
            self.layers.append((layer.input_layernorm.weight, at.q_proj, at.k_proj, at.v_proj, at.o_proj,
                                getattr(at, "scaling", self.head_dim ** -0.5),
                                layer.post_attention_layernorm.weight, mlp.gate_proj, mlp.up_proj, mlp.down_proj))

    @torch.no_grad()
    def step(self, token: int, cache, key_is_image: torch.Tensor) -> torch.Tensor:
        m = self.model
        dev = m.embed_tokens.weight.device
        ids = torch.tensor([[token]], device=dev)
        x = m.embed_tokens(ids)  # [1, 1, H]: a text token's row of the trainable embedding copy
        pos = torch.tensor([[cache.get_seq_length()]], device=dev)
        cos, sin = self.dec.rotary_emb(x, pos)  # [1, 1, D]
        half = self.head_dim // 2
        cos = cos[:, None]  # [1, 1, 1, D]
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)[:, None]  # rotate_half's sign folded in
        mode = m.attention_mode
        nh, nkv, d, hsz = self.n_heads, self.n_kv, self.head_dim, (self.hidden,)
        for i, (w1, q_proj, k_proj, v_proj, o_proj, scaling, w2, gate, up, down) in enumerate(self.layers):
            h = F.rms_norm(x, hsz, w1, self.eps)
            q = q_proj(h).view(1, nh, 1, d)  # one token: [1, 1, nh*d] is [1, nh, 1, d] already
            k = k_proj(h).view(1, nkv, 1, d)
            v = v_proj(h).view(1, nkv, 1, d)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            k, v = append_kv(cache, i, k, v)
            a = attention.mmca_attention(q, k, v, key_is_image, None, scaling, mode)  # [1, nh, 1, d]
            x = x + o_proj(a.view(1, 1, nh * d))
            h = F.rms_norm(x, hsz, w2, self.eps)
            x = x + down(F.silu(gate(h)) * up(h))
        x = F.rms_norm(x, hsz, self.dec.norm.weight, self.eps)
        return self.head(x)[0, -1].float()


def lean_decoder(vc) -> LeanDecoder | None:
    """The LeanDecoder for ``vc`` (built once, kept on it), or None where it does not apply."""
    if unsupported_reason(vc.model) is not None:
        return None
    from .lowp import lm_format

    lean = getattr(vc, "_lean_decoder", None)
    if lean is None or lean.model is not vc.model or lean.weights != lm_format(vc.model.lm):
        lean = vc._lean_decoder = LeanDecoder(vc.model)
    return lean
