"""The module that joins vision encoder, projection, trainable embedding copy and frozen LM.

``VisualChatModel`` is the ``nn.Module`` the trainer optimises; ``VisualChat`` is what users load:
``VisualChat.from_pretrained(path)`` and ``vc.new_session()``.
"""
from __future__ import annotations

import functools
import inspect
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import attention, kernels
from .assets import resolve_lm, shipped_checkpoint
from .config import AttentionMode, VisualChatConfig
from .encoders import VisionEncoder, build_encoder
from .projection import Projection
from .template import IGNORE_INDEX, Template

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=None)
def _cache_kw(decoder_type: type) -> str:
    """transformers 5 renamed the decoders' ``past_key_values`` argument and output to ``cache`` (the old
    name logs a deprecation warning on every call); use whichever this decoder takes."""
    return "cache" if "cache" in inspect.signature(decoder_type.forward).parameters else "past_key_values"


def freeze(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


@dataclass
class LossOutput:
    """:meth:`VisualChatModel.forward` with labels: the mean cross-entropy per label token (a scalar
    tensor) and the number of label tokens it is the mean over."""

    loss: torch.Tensor
    n_tokens: int


@dataclass
class LogitsOutput:
    """:meth:`VisualChatModel.forward` without labels: float32 logits ``[B, L', vocab]`` and the LM's KV
    cache after this forward (None unless ``use_cache``)."""

    logits: torch.Tensor
    cache: Any = None


class VisualChatModel(nn.Module):
    """Frozen encoder -> trainable ``projection`` (``vis_proj``: see :mod:`visualchat.projection`) ->
    image rows; trainable ``embed_tokens`` copy for text rows; frozen causal LM with MMCA (or causal)
    attention. The LM's own input embedding stays untouched: it is the base the checkpoint's sparse
    embedding rows are measured against, and the output head when the LM ties them."""

    def __init__(self, lm: nn.Module, encoder: VisionEncoder, attention_mode: AttentionMode = "mmca",
                 vis_proj: str = "linear", concepts: dict | None = None):
        super().__init__()
        if attention_mode not in attention.MODES:
            raise ValueError(f"attention must be one of {attention.MODES}, got {attention_mode!r}")
        self.lm = freeze(lm)
        self.encoder = freeze(encoder)
        self.attention_mode = attention_mode
        lm.config._attn_implementation = attention.register()
        base = lm.get_input_embeddings().weight
        self.projection = Projection(vis_proj, encoder.hidden_size, base.shape[1], encoder.num_tokens, concepts).to(
            device=base.device, dtype=base.dtype)
        self.embed_tokens = nn.Embedding(base.shape[0], base.shape[1], device=base.device, dtype=base.dtype)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(base.detach().to(self.embed_tokens.weight.dtype))

    def train(self, mode: bool = True):  # the frozen parts stay in eval mode
        super().train(mode)
        self.lm.eval()
        self.encoder.eval()
        return self

    @property
    def image_tokens(self) -> int:
        """K: the LM rows one image takes (the encoder's tokens, or a perceiver's latents)."""
        return self.projection.out_tokens

    @property
    def base_embedding(self) -> torch.Tensor:
        return self.lm.get_input_embeddings().weight

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        """PIL images -> frozen encoder features ``[n, K, d_vis]`` (not yet projected)."""
        return self.encoder.encode(images)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features of whole images ``[n, K_in, d_vis]`` -> LM rows ``[n, K, H]``."""
        return self.projection(feats.to(self.projection.first.weight.dtype))

    def image_embeds(self, features: Sequence[torch.Tensor], rows: Sequence[tuple[int, int]]) -> torch.Tensor:
        """The LM rows ``[len(rows), H]`` of the image slots ``rows``, ``(image, row)`` pairs with row < K,
        from each image's encoder features ``features[image]`` ``[K_in, d_vis]``. A per-token projection
        projects just those feature rows; the others (perceiver, words), whose rows each depend on the
        whole image, project the whole images and keep the rows asked for. What :meth:`forward` takes as
        ``image_embeds``."""
        dev = self.projection.first.weight.device
        if self.projection.per_token:
            return self.project(torch.stack([features[i][j] for i, j in rows]).to(dev))
        imgs = sorted({i for i, _ in rows})
        proj = self.project(torch.stack([features[i] for i in imgs]).to(dev))  # [n, K, H]
        at = {img: n for n, img in enumerate(imgs)}
        return torch.stack([proj[at[i]][j] for i, j in rows])

    def embed(self, input_ids: torch.Tensor, is_image: torch.Tensor, image_rows: torch.Tensor | None,
              image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, is_image ``[B, L]``. The image slots, in order, are filled from either
        ``image_rows``: encoder features, one row per slot ``[n_rows, d_vis]`` for a per-token projection
        (linear, baseline, mlp), or whole images ``[n, K_in, d_vis]`` (any projection); or
        ``image_embeds``: rows already projected, ``[n_rows, H]``. Returns ``[B, L, H]``."""
        x = self.embed_tokens(input_ids)  # [B, L, H]
        n_slots = int(is_image.sum())
        if image_embeds is not None:
            proj = image_embeds.reshape(-1, image_embeds.shape[-1])
        elif image_rows is None or image_rows.numel() == 0:
            if n_slots:
                raise ValueError(f"{n_slots} image slots but no image features")
            return x
        elif self.projection.per_token:
            proj = self.project(image_rows.reshape(-1, image_rows.shape[-1]))  # [n_rows, H]
        else:
            k_in = self.projection.in_tokens
            if image_rows.numel() % (k_in * image_rows.shape[-1]):
                raise ValueError(f"image features of shape {tuple(image_rows.shape)} are not whole images of "
                                 f"{k_in} tokens")
            proj = self.project(image_rows.reshape(-1, k_in, image_rows.shape[-1]))  # [n, K, H]
            proj = proj.reshape(-1, proj.shape[-1])
        if proj.shape[0] != n_slots:
            raise ValueError(f"image features give {proj.shape[0]} rows but the prompt has {n_slots} image slots")
        return x.masked_scatter(is_image[..., None].to(x.device), proj.to(x.dtype))

    def forward(self, input_ids, is_image, image_rows=None, padding_mask=None, labels=None,
                past_key_values=None, key_is_image=None, use_cache=False, logits_to_keep: int = 0,
                attention_mode: AttentionMode | None = None, image_embeds=None) -> LossOutput | LogitsOutput:
        """One forward. With ``labels`` (aligned with input_ids, -100 = no loss) returns a
        :class:`LossOutput`: the head runs only at label positions. Else a :class:`LogitsOutput` (the
        logits of the last ``logits_to_keep`` positions, all if 0, and the KV cache).
        ``key_is_image`` covers cached + new keys (defaults to ``is_image`` without a cache)."""
        embeds = self.embed(input_ids, is_image, image_rows, image_embeds)
        decoder = self.lm.get_decoder()
        kis = is_image if key_is_image is None else key_is_image
        out = decoder(
            inputs_embeds=embeds, **{_cache_kw(type(decoder)): past_key_values}, use_cache=use_cache,
            vc_key_is_image=kis.bool(), vc_key_padding_mask=padding_mask,
            vc_attention_mode=attention_mode or self.attention_mode,
        )
        hidden = out.last_hidden_state  # [B, L, H]
        head = self.lm.get_output_embeddings()
        if labels is not None:
            target = labels[:, 1:]
            where = target != IGNORE_INDEX  # predict token t+1 from position t
            h = hidden[:, :-1][where]  # [n, H]
            logits = head(h).float()
            n = int(where.sum())
            loss = F.cross_entropy(logits, target[where], reduction="sum") / max(n, 1)
            return LossOutput(loss, n)
        h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        return LogitsOutput(head(h).float(), getattr(out, _cache_kw(type(decoder))))

    @staticmethod
    def new_cache():
        """An empty KV cache that keeps every key on every layer, sliding-window layers included: the
        visualchat attention applies windows itself, and a chat's prefix cache must be able to crop
        back to any earlier point (transformers' sliding-window layers cannot, once full)."""
        from transformers import DynamicCache

        return DynamicCache()


def load_lm(spec: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
            quantization: str | None = None, trust_remote_code: bool = False):
    """An HF causal LM and its tokenizer from an id, a local path or ``"default"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_lm(spec)
    kw: dict = {"dtype": dtype or torch.float32, "trust_remote_code": trust_remote_code}
    if quantization in ("4bit", "8bit"):
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit",
            bnb_4bit_compute_dtype=dtype or torch.float32, bnb_4bit_quant_type="nf4")
    elif quantization not in (None, "none"):
        raise ValueError(f"quantization must be 4bit, 8bit or none, got {quantization!r}")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        lm = AutoModelForCausalLM.from_pretrained(path, **kw)
    except OSError as e:
        raise OSError(f"could not load the language model {spec!r} (from {path!r}): {e}") from None
    if quantization not in ("4bit", "8bit"):
        lm.to(device)
    return lm, tok


def config_for(model: VisualChatModel, lm_spec: str, **config_kw) -> VisualChatConfig:
    """The config that describes ``model`` (its encoder, projection, attention, K and dims): the one
    place a :class:`VisualChatConfig` is assembled from a built model."""
    emb = model.base_embedding
    shape = getattr(emb, "ds_shape", emb.shape)  # a partitioned ZeRO-3 parameter holds only its share
    return VisualChatConfig(lm=lm_spec, vision=model.encoder.spec(), attention=model.attention_mode,
                            vis_proj=model.projection.spec, image_tokens=model.image_tokens,
                            vision_hidden_size=model.encoder.hidden_size, lm_hidden_size=shape[1],
                            vocab_size=shape[0], concepts=model.projection.concepts, **config_kw)


class VisualChat:
    """A loaded model ready to chat: ``vc.new_session().ask("What is in Image 1?", images=[img])``."""

    def __init__(self, model: VisualChatModel, tokenizer, config: VisualChatConfig, path: str | None = None,
                 untrained: bool = False):
        if model.image_tokens != config.image_tokens:
            raise ValueError(f"config says K={config.image_tokens} but the model gives {model.image_tokens} rows per image")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.template = Template(tokenizer, config.image_tokens)
        self.path = path  # the checkpoint directory it was loaded from (None: built from parts)
        self.untrained = untrained  # True: no checkpoint was loaded, the projection is random
        self.lm_weights, self.lm_weights_note = None, None  # the LM's linear-weight format (visualchat.kernels.lowp)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_components(cls, lm, tokenizer, encoder: VisionEncoder, attention: str = "mmca",
                        lm_spec: str = "custom", vis_proj: str = "linear", concepts: dict | None = None,
                        **config_kw) -> "VisualChat":
        """Build an (untrained) model from loaded parts: any HF causal LM, its tokenizer, an encoder
        (``concepts``: the cells and labels of a ``words`` projection, whose word tables are filled from
        this LM's embedding)."""
        model = VisualChatModel(lm, encoder, attention, vis_proj, concepts)
        if model.projection.kind == "words":
            model.projection.net.init_tables(tokenizer, model.base_embedding)
        return cls(model, tokenizer, config_for(model, lm_spec, **config_kw))

    @classmethod
    def from_pretrained(cls, path: str | None = None, *, lm: str | None = None, vision: str | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        quantization: str | None = None, share_with: "VisualChat | None" = None,
                        trust_remote_code: bool = False, lm_weights: str | None = "auto") -> "VisualChat":
        """Load a checkpoint directory. ``path=None`` loads the embedded default (SmolLM2-135M-Instruct
        + EfficientNet-Lite0) with its shipped MMCA checkpoint, or an untrained projection if none is
        shipped. ``lm``/``vision`` override where the base parts come from (e.g. a local copy of the
        LM the checkpoint names). ``share_with`` reuses another VisualChat's frozen LM and encoder
        (they must be the same base), so two checkpoints cost one model's memory; when either holds
        LoRA adapters (folded into the weights at load) it loads its own copy instead. ``lm_weights``:
        the frozen LM's linear weights on CPU (:mod:`visualchat.kernels.lowp`): ``auto`` (the default, as the app
        serves them: fp16 where the CPU has it, the fastest format that keeps the answers), ``fp16``,
        ``bf16``, or ``fp32``/None to leave them as loaded. ``auto`` changes nothing on a GPU, for a
        ``dtype`` other than float32, or with ``quantization``."""
        from .checkpoint import load_trainable

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        custom_base = (lm or "default") != "default" or (vision or "default") not in ("default", "efficientnet-lite0")
        if path is None and not custom_base:
            path = shipped_checkpoint()
        if path is None:
            warnings.warn("no checkpoint given (and none shipped for this base in assets/checkpoints): the "
                          "projection is UNTRAINED, so answers will ignore the images")
        config = VisualChatConfig.load(path) if path is not None else VisualChatConfig(lm=lm or "default")
        if share_with is not None and (config.lora or share_with.config.lora):
            # LoRA adapters are folded into the weights they adapt: such an LM (or encoder) is no longer
            # the shared frozen base, so either checkpoint having adapters means loading its own copy
            log.info("%s: not sharing the LM and encoder of %s (LoRA adapters change them); loading its own",
                     path, share_with.path)
            share_with = None
        if share_with is not None:
            base_lm, tok, enc = share_with.model.lm, share_with.tokenizer, share_with.model.encoder
        else:
            base_lm, tok = load_lm(lm or config.lm, dtype, device, quantization, trust_remote_code)
            enc = build_encoder(vision or config.vision).to(device=device, dtype=dtype)
        model = VisualChatModel(base_lm, enc, config.attention, config.vis_proj, config.concepts)
        model.projection.to(device=device, dtype=dtype)
        model.embed_tokens.to(device=device, dtype=dtype)
        if path is not None:
            rest = load_trainable(model, path, config)
            if config.lora:
                from .lora import load_lora, merge_lora

                load_lora(model, config.lora, rest)
                merge_lora(model)  # served as plain layers: low-precision weights and the lean decode apply
        else:
            config = config_for(model, lm or "default")
        vc = cls(model, tok, config, path=path, untrained=path is None)
        from .kernels import lowp

        if lowp.normalize(lm_weights) == "auto" and (dtype != torch.float32 or quantization):
            lm_weights = None  # the formats are float32 in, float32 out; bitsandbytes has its own
        vc.lm_weights, vc.lm_weights_note = lowp.apply(base_lm, lm_weights, device)
        return vc

    # -- use ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.projection.first.weight.device

    @property
    def context_window(self) -> int:
        lm_max = getattr(self.model.lm.config, "max_position_embeddings", None) or 4096
        return min(self.config.max_seq_len or lm_max, lm_max)

    @torch.no_grad()
    def decode_step(self, token: int, cache, cache_is_image: Sequence[bool]):
        """Feed one text ``token`` after ``cache``; ``cache_is_image`` covers the cached keys and the new
        one. Returns (logits ``[V]``, the cache). Runs the lean decode step where it applies
        (:func:`visualchat.kernels.lean_decoder`), else the LM through transformers."""
        lean = kernels.lean_decoder(self)
        if lean is not None:
            logits = lean.step(token, cache, cache_is_image)
            if logits is not None:
                return logits, cache
        dev = self.device
        out = self.model(torch.tensor([[token]], device=dev), torch.zeros(1, 1, dtype=torch.bool, device=dev),
                         past_key_values=cache, key_is_image=torch.tensor([list(cache_is_image)], device=dev),
                         use_cache=True, logits_to_keep=1)
        return out.logits[0, -1], out.cache

    def new_session(self, system: str | None = None):
        from .session import Session

        return Session(self, system)

    def save_pretrained(self, path: str) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(self.model, path, self.config)
