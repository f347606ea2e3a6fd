"""A lean forward for one decode step of a LLaMA-architecture LM (the embedded default).

A decode step feeds one token through every layer; on a CPU with a small model much of its time is
Python and small-op overhead around the matmuls (transformers' module calls, an RMSNorm of six ops, a
rotary embedding built from slices and a ``cat``). :class:`LeanDecoder` runs the same computation
with the same modules and weights in fewer operations: ``F.rms_norm``, the rotary embedding as
``x * cos + roll(x) * sin`` (``roll`` by half the head is ``rotate_half`` up to the sign, which is
folded into ``sin``), the KV cache's own ``update``, and :func:`visualchat.attention.mmca_attention`
(whose one-query branch is the compact MMCA decode). The logits equal the transformers path's to
float32 rounding (tests/test_lowp.py).

It is used for a session's decode steps when the LM is a plain ``llama`` model (no rope scaling
other than what the rotary module computes, SiLU MLP), the process is not one rank of several
(ranks > 0 replay rank 0's ``model.forward`` calls), and ``VISUALCHAT_DECODE`` is not ``hf``.
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
            k, v = cache.update(k, v, i)
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
