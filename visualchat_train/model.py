"""The model the trainer runs: :func:`build_model` loads the LM (built partitioned from the start under
ZeRO-3 and filled tensor by tensor from its safetensors files: :func:`load_lm_zero3`), the vision encoder and a
fresh projection into a :class:`visualchat.model.VisualChatModel`; :class:`TrainModule` is what the
engine runs (images and tokens -> loss); :func:`enable_gradient_checkpointing` wraps the LM's layers."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import TrainConfig
from .errors import TrainError
from .preflight import Plan


class TrainModule(nn.Module):
    """What the engine runs: images (as cached features or pixels) + tokens -> (loss, n_labels) (a plain
    tuple: DeepSpeed's ZeRO-3 hooks look for tensors in tuples)."""

    def __init__(self, vcm, train_encoder: bool = False, aux_loss: float = 0.0, detach_image_rows: bool = False,
                 aux_only: bool = False):
        super().__init__()
        self.vcm = vcm
        self.train_encoder = train_encoder
        self.aux_loss = aux_loss  # weight of the projection's per-image label loss (0: off)
        self.detach_image_rows = detach_image_rows  # the answers' loss stops at the image rows
        self.aux_only = aux_only  # a perception stage: the heads' loss alone, no LM forward

    def forward(self, input_ids, is_image, padding_mask, labels, image_feats=None, pixel_values=None,
                image_labels=None):
        if pixel_values is not None:
            with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
                image_feats = self.vcm.encoder(pixel_values.to(next(self.vcm.encoder.parameters()).dtype))
        proj = self.vcm.projection
        if self.aux_only:  # (loss, labelled images): a sample without labelled images adds nothing
            if image_labels is None or image_feats is None:
                return proj.first.weight.sum() * 0.0, 0
            labelled = int((image_labels >= 0).any(-1).sum())
            return self._aux(image_feats, image_labels), labelled
        if self.detach_image_rows and image_feats is not None:
            rows = self.vcm.project(self._whole_images(image_feats))
            out = self.vcm(input_ids, is_image, None, padding_mask, labels, image_embeds=rows.detach())
        else:
            out = self.vcm(input_ids, is_image, image_feats, padding_mask, labels)
        loss = out.loss
        if self.aux_loss and image_labels is not None and image_feats is not None:
            # the answers' loss plus the heads' loss on what every labelled image shows (--aux_loss)
            loss = loss + self.aux_loss * self._aux(image_feats, image_labels)
        return loss, out.n_tokens

    def _whole_images(self, image_feats: torch.Tensor) -> torch.Tensor:
        """Cached or computed features ``[n, K_in, d_vis]`` (or their rows) in the projection's dtype."""
        proj = self.vcm.projection
        return image_feats.reshape(-1, proj.in_tokens, image_feats.shape[-1]).to(proj.first.weight.dtype)

    def _aux(self, image_feats: torch.Tensor, image_labels: torch.Tensor) -> torch.Tensor:
        """The words projection's heads' loss against every image's per-cell labels."""
        feats = self._whole_images(image_feats)
        return self.vcm.projection.net.aux_loss(feats, image_labels.to(feats.device))


def enable_gradient_checkpointing(lm: nn.Module) -> int:
    """Recompute every decoder layer in backward (non-reentrant checkpoint around each layer's
    forward). Works while the frozen LM stays in eval mode. Returns how many layers were wrapped."""
    import functools

    from torch.utils.checkpoint import checkpoint

    decoder = lm.get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TrainError(f"--gradient_checkpointing: {type(decoder).__name__} has no .layers")
    for layer in layers:
        fwd = layer.forward

        @functools.wraps(fwd)
        def wrapped(*a, _fwd=fwd, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_fwd, *a, use_reentrant=False, **kw)
            return _fwd(*a, **kw)

        layer.forward = wrapped
    return len(layers)


def zero3_init_enabled(cfg: TrainConfig, plan: Plan) -> bool:
    """Whether the LM is built partitioned from the start (DeepSpeed ZeRO-3, not QLoRA): no rank ever
    holds the whole LM (the load peak per rank is its share plus one gathered parameter, and on rank
    0 that parameter's tensor as read from the checkpoint: :func:`load_lm_zero3`)."""
    return plan.engine == "deepspeed" and cfg.zero_stage == 3 and not cfg.qlora


def load_dtype(cfg: TrainConfig, plan: Plan) -> torch.dtype:
    """The LM's dtype at load: the run's precision when it is built partitioned under ZeRO-3 (DeepSpeed
    keeps fp32 masters of the trainable parameters only), fp32 otherwise (the engine casts later)."""
    if zero3_init_enabled(cfg, plan):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)
    return torch.float32


@contextlib.contextmanager
def partitioned_load(ds_config: dict):
    """transformers' ZeRO-3 path for ``from_pretrained`` (its ``HfDeepSpeedConfig``): the model is
    created inside ``deepspeed.zero.Init`` with this run's DeepSpeed config ``ds_config`` (so in its precision), and
    rank 0 copies the weights into the partitions one module at a time. Only for the LM: the flag is
    cleared again before anything else is loaded."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # DeepSpeed's process group is up already (load_lm_zero3 starts it), so the config sees every rank
    hf_config = HfDeepSpeedConfig(ds_config)  # noqa: F841 - held alive while loading
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def load_lm_zero3(lm_spec: str, cfg: TrainConfig, plan: Plan, ds_config: dict):
    """(LM, tokenizer) built partitioned under ZeRO-3 (with the run's DeepSpeed config ``ds_config``) in
    the run's precision. A local checkpoint with safetensors weights is filled tensor by tensor (:func:`visualchat_train.zero3.partitioned_lm`: rank 0 holds
    one tensor of the checkpoint at a time; a hub id already in the hub cache counts); anything else
    (a hub id not downloaded yet, ``.bin`` or GGUF weights,
    ``--trust_remote_code``) goes through transformers' ZeRO-3 loader (:func:`partitioned_load`),
    which reads the whole checkpoint into one state dict on rank 0 before copying it in."""
    from transformers import AutoTokenizer

    from visualchat.deepspeed_ops import disable_shm_comm_build
    from visualchat.model import load_lm, resolve_lm

    from .zero3 import local_lm_folder, partitioned_lm

    import deepspeed

    disable_shm_comm_build()  # init_distributed would otherwise build the shm all-reduce op (minutes)
    deepspeed.init_distributed()  # wraps the process group D.init() made, so zero.Init sees every rank
    path = local_lm_folder(resolve_lm(lm_spec))
    lm = partitioned_lm(path, ds_config, load_dtype(cfg, plan), cfg.trust_remote_code)
    if lm is None:
        with partitioned_load(ds_config):
            return load_lm(lm_spec, load_dtype(cfg, plan), plan.device, None, cfg.trust_remote_code)
    return lm, AutoTokenizer.from_pretrained(path)


def gathered_base(vcm, cfg: TrainConfig, plan: Plan):
    """A context in which the LM's input embedding is whole on every rank (a no-op unless the LM was
    loaded partitioned)."""
    if not zero3_init_enabled(cfg, plan):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([vcm.base_embedding])


def build_model(cfg: TrainConfig, plan: Plan, ds_config: dict | None):
    """(VisualChatModel, tokenizer, lm spec for the checkpoint config). ``ds_config``: the run's DeepSpeed
    config (:func:`visualchat_train.preflight.deepspeed_config`, None for the torch engine), which a ZeRO-3 load
    builds the LM and the encoder partitioned under."""
    from visualchat.model import VisualChatModel, load_lm

    from .tiny import is_tiny, resolve_lm_spec, resolve_vision_spec

    lm_spec = resolve_lm_spec(cfg.lm) if is_tiny(cfg.lm) else cfg.lm
    vision_spec = resolve_vision_spec(cfg.vision)
    partitioned = zero3_init_enabled(cfg, plan)
    try:
        if partitioned:
            lm, tok = load_lm_zero3(lm_spec, cfg, plan, ds_config)
        else:
            lm, tok = load_lm(lm_spec, load_dtype(cfg, plan), plan.device, "4bit" if cfg.qlora else None,
                              cfg.trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"could not load --lm {cfg.lm!r}: {e}") from None
    try:
        from .zero3 import build_encoder as build_encoder_z3  # a large encoder partitioned under ZeRO-3

        enc = build_encoder_z3(vision_spec, plan.device, ds_config if partitioned else None,
                               load_dtype(cfg, plan))
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"could not load --vision {cfg.vision!r}: {e}") from None
    gather_base = contextlib.ExitStack()  # ZeRO-3 load: the LM's embedding whole while the model copies it
    if partitioned:
        import deepspeed

        gather_base.enter_context(deepspeed.zero.GatheredParameters([lm.get_input_embeddings().weight]))
    torch.manual_seed(cfg.seed)  # the projection's initialisation
    concepts = None
    if cfg.vis_proj.partition(":")[0] == "words":  # the one data set with per-cell labels names the concept space
        from .data.shapes import CONCEPTS as concepts
    try:
        vcm = VisualChatModel(lm, enc, cfg.attention, cfg.vis_proj, concepts)
        if concepts is not None:
            vcm.projection.net.init_tables(tok, vcm.base_embedding)
    except ValueError as e:
        raise TrainError(f"--vis_proj {cfg.vis_proj!r}: {e}") from None
    finally:
        gather_base.close()
    if cfg.projection_init_scale != 1.0:
        with torch.no_grad():
            for p in vcm.projection.parameters():
                p.mul_(cfg.projection_init_scale)
    if cfg.init_from:
        from visualchat.checkpoint import CheckpointMismatch, load_trainable

        try:
            # another token grid of the same encoder is fine: the projection acts on each token
            vcm.init_lora = load_trainable(vcm, cfg.init_from, any_grid=True)  # its LoRA factors, for the trainer
        except (OSError, ValueError, CheckpointMismatch) as e:
            raise TrainError(f"could not start from --init_from {cfg.init_from!r}: {e}") from None
    if cfg.precision == "bf16" and plan.engine == "torch":
        # Mixed precision for the plain engine: the frozen LM in bf16 and the embedding output cast to
        # bf16, so the whole residual stream runs in bf16 (about 2-3x faster than fp32 on a CPU with
        # bf16 support), while the trainable parameters stay fp32 masters that receive fp32 gradients.
        # The encoder stays fp32 (its features are usually cached once).
        if not cfg.qlora:
            vcm.lm.to(torch.bfloat16)
        vcm.embed_tokens.register_forward_hook(lambda mod, inp, out: out.to(torch.bfloat16))
    return vcm, tok, lm_spec
