"""The training loop: preflight checks, model and data, DeepSpeed (or plain PyTorch) engine,
validation, export in the app's checkpoint format, resumable state, progress and plots.

Only ``projection``, ``embed_tokens`` and LoRA weights (when on) are trainable and given to the
optimiser; the LM and the encoder stay frozen (in ZeRO-3 they are still partitioned: the whole
module goes to DeepSpeed, only the trainable parameters to the optimiser).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import dist as D
from .samples import GENERATED, Sample, build_samples_from_args, check_datasets, parse_names

log = logging.getLogger("train")


class TrainError(Exception):
    """A problem found before (or instead of) training, with a message for the user."""


# -- preflight ---------------------------------------------------------------------------------
def earlier_stages(init_from: str) -> list[dict]:
    """The provenance of the stages a run continues (``--init_from``): each earlier stage's command,
    hardware, steps and wall time, oldest first, so a staged recipe's checkpoint records all of it."""
    try:
        with open(os.path.join(init_from, "config.json")) as f:
            info = json.load(f).get("info", {})
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(info, dict):
        return []
    keep = ("command", "hardware", "precision", "datasets", "train_samples", "global_batch", "lr", "seed", "steps",
            "wall_time_s", "tokens_seen", "val_loss")
    before = info.get("earlier_stages") if isinstance(info.get("earlier_stages"), list) else []
    return before + [{k: info[k] for k in keep if k in info}]


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - very old torch
        return True


def deepspeed_available() -> bool:
    try:
        import deepspeed  # noqa: F401
        return True
    except Exception:
        return False


def parse_betas(value: str) -> tuple[float, float]:
    try:
        b1, b2 = (float(x) for x in str(value).split(","))
    except ValueError:
        raise TrainError(f"--adam_betas must be two numbers 'b1,b2', got {value!r}") from None
    if not (0 <= b1 < 1 and 0 <= b2 < 1):
        raise TrainError(f"--adam_betas must lie in [0, 1), got {value!r}")
    return b1, b2


@dataclass
class Plan:
    engine: str
    world: int
    rank: int
    device: torch.device
    micro: int
    accum: int
    global_batch: int
    betas: tuple[float, float]
    names: list[str]
    ds_config_override: dict = field(default_factory=dict)
    resume_dir: str | None = None


def preflight(args) -> Plan:
    """Every check that needs no model and no data: raises TrainError with a clear message."""
    names = parse_names(args.dataset_names)
    try:
        check_datasets(names, args.data_path)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(str(e)) from None
    world = D.world_size()
    rank = D.rank()
    device = D.device()
    engine = args.engine
    if engine == "auto":
        engine = "deepspeed" if deepspeed_available() else "torch"
    if engine == "deepspeed" and not deepspeed_available():
        raise TrainError("--engine deepspeed but DeepSpeed is not installed (pip install deepspeed)")
    if engine == "torch":
        if world > 1:
            raise TrainError(f"the plain PyTorch engine runs one process; {world} were launched: use --engine deepspeed")
        if args.zero_stage:
            raise TrainError(f"--zero_stage {args.zero_stage} needs --engine deepspeed")
        if args.offload != "none":
            raise TrainError("--offload needs --engine deepspeed")
    micro = args.per_device_batch_size
    if micro < 1 or args.grad_accum_steps < 1:
        raise TrainError("--per_device_batch_size and --grad_accum_steps must be >= 1")
    accum = args.grad_accum_steps
    if args.global_batch_size:
        if args.global_batch_size % (micro * world):
            raise TrainError(f"--global_batch_size {args.global_batch_size} is not divisible by per_device_batch_size "
                             f"{micro} x {world} process(es) = {micro * world}")
        accum = args.global_batch_size // (micro * world)
        if args.grad_accum_steps not in (1, accum):
            raise TrainError(f"--grad_accum_steps {args.grad_accum_steps} disagrees with --global_batch_size "
                             f"{args.global_batch_size}, which at micro-batch {micro} x {world} process(es) needs "
                             f"accumulation {accum}: give one of them (a preset's global batch sets the accumulation)")
    override = {}
    if args.deepspeed_config:
        if not os.path.isfile(args.deepspeed_config):
            raise TrainError(f"--deepspeed_config {args.deepspeed_config!r} does not exist")
        with open(args.deepspeed_config) as f:
            try:
                override = json.load(f)
            except json.JSONDecodeError as e:
                raise TrainError(f"--deepspeed_config {args.deepspeed_config}: not valid JSON: {e}") from None
        if engine != "deepspeed":
            raise TrainError("--deepspeed_config needs --engine deepspeed")
        m = override.get("train_micro_batch_size_per_gpu", micro)
        a = override.get("gradient_accumulation_steps", accum)
        if isinstance(m, int) and isinstance(a, int):
            micro, accum = m, a
        tb = override.get("train_batch_size")
        if isinstance(tb, int) and tb != micro * accum * world:
            raise TrainError(f"the DeepSpeed config's train_batch_size {tb} does not divide into micro-batch {micro} x "
                             f"accumulation {accum} x {world} process(es) = {micro * accum * world}")
    if args.precision == "auto":  # resolved once, here, so everything after sees what runs
        args.precision = "bf16" if bf16_supported(device) else "fp32"
        log.info("--precision auto: %s on this %s", args.precision, device.type.upper())
    if args.precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a CUDA GPU (loss scaling on CPU is not supported); use bf16 or fp32")
    if args.precision == "bf16" and not bf16_supported(device):
        raise TrainError(f"--precision bf16 is not supported on this {device.type.upper()} "
                         f"({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'CPU'}); use fp32"
                         + (" or fp16" if device.type == "cuda" else ""))
    if args.qlora:
        if args.lora_rank <= 0:
            raise TrainError("--qlora trains LoRA adapters on a 4-bit base: give --lora_rank > 0")
        if args.zero_stage == 3:
            raise TrainError("--qlora with ZeRO-3 is not supported (4-bit weights cannot be partitioned); use --zero_stage 2")
        from .lora import qlora_unsupported_reason

        why = qlora_unsupported_reason()
        if why:
            raise TrainError(f"--qlora: {why}")
    if args.lora_rank < 0 or args.vision_lora_rank < 0:
        raise TrainError("LoRA ranks must be >= 0")
    if args.max_seq_len < 8:
        raise TrainError("--max_seq_len must be >= 8")
    if args.eval_every < 0 or args.save_every < 0:
        raise TrainError("--eval_every and --save_every must be >= 0")
    if not (math.isfinite(args.projection_init_scale) and args.projection_init_scale > 0):
        raise TrainError("--projection_init_scale must be a positive number (0, every image token exactly zero, "
                         f"made bf16 training diverge), got {args.projection_init_scale}")
    if args.embedding_lr is not None and not (math.isfinite(args.embedding_lr) and args.embedding_lr >= 0):
        raise TrainError(f"--embedding_lr must be a number >= 0 (0 freezes the embedding), got {args.embedding_lr}")
    if args.feature_workers < 0:
        raise TrainError(f"--feature_workers must be >= 0 (0: automatic), got {args.feature_workers}")
    if args.projection_lr is not None and not (math.isfinite(args.projection_lr) and args.projection_lr >= 0):
        raise TrainError(f"--projection_lr must be a number >= 0, got {args.projection_lr}")
    if not 0 <= args.val_ratio < 1:
        raise TrainError("--val_ratio must be in [0, 1)")
    if getattr(args, "warmup_steps", None) is not None and args.warmup_steps < 0:
        raise TrainError(f"--warmup_steps must be >= 0, got {args.warmup_steps}")
    if not 0 <= args.warmup_ratio <= 1:
        raise TrainError(f"--warmup_ratio must be in [0, 1], got {args.warmup_ratio}")
    if getattr(args, "data_workers", 0) < 0 or getattr(args, "prefetch_factor", 2) < 1:
        raise TrainError("--data_workers must be >= 0 and --prefetch_factor >= 1")
    if getattr(args, "eval_batch_size", 0) < 0:
        raise TrainError(f"--eval_batch_size must be >= 0 (0: --per_device_batch_size), got {args.eval_batch_size}")
    if getattr(args, "scheduler_cycles", 1.0) <= 0 or getattr(args, "scheduler_power", 1.0) <= 0:
        raise TrainError("--scheduler_cycles and --scheduler_power must be > 0")
    for flag, allow_all in (("blend_llava_per_image", False), ("blend_cgd_questions", True)):
        try:
            from .samples import parse_draw

            parse_draw(getattr(args, flag, "1"), "--" + flag, allow_all)
        except ValueError as e:
            raise TrainError(str(e)) from None
    betas = parse_betas(args.adam_betas)
    from .resume import find_resume, check_meta

    resume_dir = find_resume(args.resume, args.output_dir)
    if resume_dir is not None:
        check_meta(resume_dir, run_meta(args, engine, world))
    return Plan(engine, world, rank, device, micro, accum, micro * accum * world, betas, names, override, resume_dir)


def run_meta(args, engine: str, world: int) -> dict:
    """What a resumable checkpoint must agree with to be resumed."""
    return {"lm": args.lm, "vision": args.vision, "attention": args.attention, "engine": engine,
            "zero_stage": args.zero_stage if engine == "deepspeed" else None, "world_size": world,
            "lora_rank": args.lora_rank, "vision_lora_rank": args.vision_lora_rank, "qlora": bool(args.qlora),
            "precision": args.precision}


# -- model -------------------------------------------------------------------------------------
class TrainModule(nn.Module):
    """What the engine runs: images (as cached features or pixels) + tokens -> (loss, n_labels)."""

    def __init__(self, vcm, train_encoder: bool = False):
        super().__init__()
        self.vcm = vcm
        self.train_encoder = train_encoder

    def forward(self, input_ids, is_image, padding_mask, labels, image_feats=None, pixel_values=None):
        if pixel_values is not None:
            with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
                image_feats = self.vcm.encoder(pixel_values.to(next(self.vcm.encoder.parameters()).dtype))
        return self.vcm(input_ids, is_image, image_feats, padding_mask, labels)


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


def zero3_init_enabled(args, plan: Plan) -> bool:
    """Whether the LM is built partitioned from the start (DeepSpeed ZeRO-3, not QLoRA): no rank ever
    holds the whole LM (the load peak per rank is its share plus, on rank 0, the checkpoint's
    memory-mapped shards while they are copied in)."""
    return plan.engine == "deepspeed" and args.zero_stage == 3 and not args.qlora


def load_dtype(args, plan: Plan) -> torch.dtype:
    """The LM's dtype at load: the run's precision when it is built partitioned under ZeRO-3 (DeepSpeed
    keeps fp32 masters of the trainable parameters only), fp32 otherwise (the engine casts later)."""
    if zero3_init_enabled(args, plan):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision, torch.float32)
    return torch.float32


@contextlib.contextmanager
def partitioned_load(args, plan: Plan):
    """transformers' ZeRO-3 path for ``from_pretrained`` (its ``HfDeepSpeedConfig``): the model is
    created inside ``deepspeed.zero.Init`` with this run's DeepSpeed config (so in its precision), and
    rank 0 copies the weights into the partitions one module at a time. Only for the LM: the flag is
    cleared again before anything else is loaded."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from visualchat.deepspeed_ops import disable_shm_comm_build

    disable_shm_comm_build()  # init_distributed would otherwise build the shm all-reduce op (minutes)
    deepspeed.init_distributed()  # wraps the process group D.init() made, so the config sees every rank
    hf_config = HfDeepSpeedConfig(deepspeed_config(args, plan))  # noqa: F841 - held alive while loading
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del hf_config


def gathered_base(vcm, args, plan: Plan):
    """A context in which the LM's input embedding is whole on every rank (a no-op unless the LM was
    loaded partitioned)."""
    if not zero3_init_enabled(args, plan):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([vcm.base_embedding])


def build_model(args, plan: Plan):
    """(VisualChatModel, tokenizer, lm spec for the checkpoint config)."""
    from visualchat.encoders import build_encoder
    from visualchat.model import VisualChatModel, load_lm

    from .tiny import is_tiny, resolve_lm_spec, resolve_vision_spec

    lm_spec = resolve_lm_spec(args.lm) if is_tiny(args.lm) else args.lm
    vision_spec = resolve_vision_spec(args.vision)
    partitioned = zero3_init_enabled(args, plan)
    try:
        with partitioned_load(args, plan) if partitioned else contextlib.nullcontext():
            lm, tok = load_lm(lm_spec, load_dtype(args, plan), plan.device, "4bit" if args.qlora else None,
                              args.trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"could not load --lm {args.lm!r}: {e}") from None
    try:
        enc = build_encoder(vision_spec).to(plan.device)
    except (OSError, ValueError, ImportError) as e:
        raise TrainError(f"could not load --vision {args.vision!r}: {e}") from None
    gather_base = contextlib.ExitStack()  # ZeRO-3 load: the LM's embedding whole while the model copies it
    if partitioned:
        import deepspeed

        gather_base.enter_context(deepspeed.zero.GatheredParameters([lm.get_input_embeddings().weight]))
    torch.manual_seed(args.seed)  # the projection's initialisation
    try:
        vcm = VisualChatModel(lm, enc, args.attention, args.vis_proj)
    except ValueError as e:
        raise TrainError(f"--vis_proj {args.vis_proj!r}: {e}") from None
    finally:
        gather_base.close()
    if args.projection_init_scale != 1.0:
        with torch.no_grad():
            for p in vcm.projection.parameters():
                p.mul_(args.projection_init_scale)
    if args.init_from:
        from visualchat.checkpoint import CheckpointMismatch, load_trainable

        try:
            # another token grid of the same encoder is fine: the projection acts on each token
            load_trainable(vcm, args.init_from, any_grid=True)
        except (OSError, ValueError, CheckpointMismatch) as e:
            raise TrainError(f"could not start from --init_from {args.init_from!r}: {e}") from None
    if args.precision == "bf16" and plan.engine == "torch":
        # Mixed precision for the plain engine: the frozen LM in bf16 and the embedding output cast to
        # bf16, so the whole residual stream runs in bf16 (about 2-3x faster than fp32 on a CPU with
        # bf16 support), while the trainable parameters stay fp32 masters that receive fp32 gradients.
        # The encoder stays fp32 (its features are usually cached once).
        if not args.qlora:
            vcm.lm.to(torch.bfloat16)
        vcm.embed_tokens.register_forward_hook(lambda mod, inp, out: out.to(torch.bfloat16))
    return vcm, tok, lm_spec


# -- batches -----------------------------------------------------------------------------------
class Batcher:
    """Micro-batches from the sample stream: the order is a seeded permutation per epoch, and
    micro-batch ``g`` on rank ``r`` takes samples ``(g * world + r) * B ...`` of the stream, so the
    order depends only on (seed, step) and resuming needs nothing else."""

    def __init__(self, samples: list[Sample], micro: int, world: int, rank: int, seed: int,
                 features=None, encoder=None, device=torch.device("cpu")):
        self.samples = samples
        self.micro, self.world, self.rank, self.seed = micro, world, rank, seed
        self.features = features  # FeatureCache or None
        self.encoder = encoder
        self.device = device
        self._orders: dict[int, list[int]] = {}
        self._bad: set = set()

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.samples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._orders = {epoch: idx}  # only the current epoch's order is kept
        return self._orders[epoch]

    def train_indices(self, micro_index: int) -> list[int]:
        n = len(self.samples)
        out = []
        for b in range(self.micro):
            j = (micro_index * self.world + self.rank) * self.micro + b
            out.append(self.order(j // n)[j % n])
        return out

    def micro_batch(self, micro_index: int, to_device: bool = True) -> dict[str, Any]:
        """Micro-batch ``micro_index`` of this rank, collated (images opened and preprocessed)."""
        return self.collate([self.samples[j] for j in self.train_indices(micro_index)], to_device=to_device)

    def collate(self, items: list[Sample], to_device: bool = True) -> dict[str, Any]:
        from visualchat.template import IGNORE_INDEX

        from .features import image_key, open_ref

        L = max(len(s) for s in items)
        B = len(items)
        pad = items[0].input_ids[0]
        ids = torch.full((B, L), pad, dtype=torch.long)
        is_img = torch.zeros(B, L, dtype=torch.bool)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        feats, ims = [], []
        for i, s in enumerate(items):
            n = len(s)
            ids[i, :n] = torch.tensor(s.input_ids)
            is_img[i, :n] = torch.tensor(s.is_image)
            labels[i, :n] = torch.tensor(s.labels)
            mask[i, :n] = True
            for ref in s.images:
                key = image_key(ref) if self.features is not None else None
                if key is not None and self.features.has(key):
                    feats.append(self.features.get(key))
                else:
                    ims.append(open_ref(ref))
        # Right padding needs no key mask: every real position comes before every pad, so under causal
        # attention and MMCA no real query ever sees a pad key, and pads carry no labels.
        out = {"input_ids": ids, "is_image": is_img, "padding_mask": None, "labels": labels, "n_tokens": int(mask.sum())}
        if feats and ims:
            raise RuntimeError("a batch mixes cached and uncached images; fill the feature cache first")
        if feats:
            out["image_feats"] = torch.stack(feats)
        elif ims:
            out["pixel_values"] = self.encoder.preprocess(ims)
        if not to_device:
            return out
        return to_device_batch(out, self.device)


def to_device_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batches ``first, first + 1, ...`` of one rank as a map-style data set: item ``i`` is
    :meth:`Batcher.micro_batch` ``(first + i)`` on the CPU, so a :class:`torch.utils.data.DataLoader`
    can open and preprocess images in worker processes ahead of the training step. The order stays the
    Batcher's (a distributed sampler keyed on seed and step: rank r takes its own share of every step,
    the same samples per step at any world size, and a resume needs only the step)."""

    def __init__(self, batcher: Batcher, first: int, count: int):
        self.batcher, self.first, self.count = batcher, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batcher.micro_batch(self.first + i, to_device=False)


def micro_batch_stream(batcher: Batcher, first: int, count: int, workers: int = 0, prefetch: int = 2,
                       pin_memory: bool = False):
    """An iterator over this rank's micro-batches ``first ..< first + count``, in order. ``workers > 0``:
    a DataLoader with that many worker processes, each keeping ``prefetch`` micro-batches ready;
    0: collated in the training process (as the loop did before)."""
    if workers <= 0:
        return (batcher.micro_batch(first + i, to_device=False) for i in range(count))
    loader = torch.utils.data.DataLoader(
        MicroBatches(batcher, first, count), batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=max(1, prefetch), persistent_workers=False, pin_memory=pin_memory)
    return iter(loader)


SCHEDULERS = ("cosine", "linear", "constant", "cosine_with_restarts", "polynomial")


def lr_lambda(total: int | list, warmup: int, kind: str, *, cycles: float = 1.0, power: float = 1.0):
    """The lr multiplier at a step. ``total`` may be a one-item list, read at every step, so the
    schedule can be shortened while it runs (``--fit_schedule_to_time``). After a linear warm-up:
    ``cosine`` / ``linear`` decay to 0, ``constant`` stays at 1, ``cosine_with_restarts`` runs
    ``cycles`` cosine decays each restarting at 1, ``polynomial`` is ``(1 - progress) ** power``
    (the original's transformers schedulers, with lr_end 0)."""
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; valid: {', '.join(SCHEDULERS)}")

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        n = total[0] if isinstance(total, list) else total
        progress = min(1.0, (step - warmup) / max(1, n - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "polynomial":
            return max(0.0, 1.0 - progress) ** power
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((cycles * progress) % 1.0)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def warmup_steps(args, total: int) -> int:
    """``--warmup_steps`` if given (at most ``total``), else ``--warmup_ratio`` of ``total``."""
    ws = getattr(args, "warmup_steps", None)
    if ws is not None:
        return min(int(ws), total)
    return int(round(args.warmup_ratio * total))


def deepspeed_config(args, plan: Plan) -> dict:
    zero: dict[str, Any] = {"stage": args.zero_stage}
    if args.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if args.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": args.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": args.precision == "bf16"},
        "fp16": {"enabled": args.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(dict(a.get(k) or {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    return merge(cfg, plan.ds_config_override)


# -- the run -----------------------------------------------------------------------------------
def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def feature_cache_root(args, names: list[str]) -> str | None:
    from visualchat.assets import cache_dir

    v = str(args.feature_cache)
    if v == "off" or args.vision_lora_rank > 0:
        return None
    if v == "auto":
        return os.path.join(cache_dir(), "features") if all(n in GENERATED for n in names) else None
    if v == "on":
        return os.path.join(cache_dir(), "features")
    return v


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("train", "train.data", "train.samples"):
        logging.getLogger(name).setLevel(level)


def train(args) -> dict:
    """Run a whole training; returns a summary (also written to output_dir/summary.json)."""
    t_start = time.time()
    setup_logging(D.rank())
    plan = preflight(args)  # every check that needs no model and no data, before any set-up
    from .lock import OutputDirLocked, OutputLock

    lock = OutputLock(args.output_dir)
    if plan.rank == 0:  # one run per output directory (rank 0 holds it for the whole job)
        try:
            lock.acquire()
        except OutputDirLocked as e:
            raise TrainError(str(e)) from None
    try:
        return _run(args, plan, t_start)
    finally:
        lock.release()


def _run(args, plan: Plan, t_start: float) -> dict:
    if plan.engine == "deepspeed" or D.launched():
        D.init()
    os.makedirs(args.output_dir, exist_ok=True)
    is_main = plan.rank == 0
    log.info("engine %s, %d process(es), device %s, micro-batch %d x accumulation %d = %d samples per step",
             plan.engine, plan.world, plan.device, plan.micro, plan.accum, plan.global_batch)

    from visualchat.model import config_for
    from visualchat.template import Template

    from . import lora as L
    from .export import export_checkpoint
    from .features import FeatureCache
    from .progress import Progress
    from .resume import Checkpointer, trainable_names

    vcm, tok, lm_spec = build_model(args, plan)
    template = Template(tok, vcm.image_tokens)
    try:
        train_s, val_s, stats = build_samples_from_args(args, plan.names, template)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(str(e)) from None
    log.info("data: %s", stats.as_dict())
    if getattr(args, "data_debug_path", None) and is_main:
        from .samples import dump_debug_samples

        n_dumped = dump_debug_samples(train_s, template, args.data_debug_path)
        log.info("--data_debug_path: wrote %d samples to %s", n_dumped, args.data_debug_path)

    # features of the frozen encoder, once
    cache = None
    root = feature_cache_root(args, plan.names)
    if root is not None:
        cache = FeatureCache(root, vcm.encoder)
        refs = [r for s in train_s + val_s for r in s.images]
        t0 = time.time()
        # each node fills its own cache (its local ranks share the work), so no shared disk is needed
        workers = args.feature_workers or min(8, max(1, (os.cpu_count() or 1) - 1))
        bad = cache.fill(vcm.encoder, refs, rank=D.local_rank(), world=D.local_world_size(),
                         progress=is_main and not args.no_progress, workers=workers)
        D.barrier()
        bad = {k: v for part in D.all_gather_object(bad) for k, v in part.items()}
        if bad:
            from .features import image_key

            for k, err in bad.items():
                log.warning("skipping samples with bad image %s: %s", k, err)
            keep = lambda s: all(image_key(r) not in bad for r in s.images)  # noqa: E731
            n0 = len(train_s) + len(val_s)
            train_s, val_s = [s for s in train_s if keep(s)], [s for s in val_s if keep(s)]
            stats.add("skipped_bad_image", n0 - len(train_s) - len(val_s))
        log.info("feature cache %s ready in %.1f s", cache.dir, time.time() - t0)
    grounding = None
    if args.projection_init == "grounded" and not (args.init_from or plan.resume_dir):
        from .grounding import ground_projection

        try:
            with gathered_base(vcm, args, plan):  # a ZeRO-3 load partitioned the LM's embedding
                grounding = ground_projection(vcm, tok, train_s, cache)
        except ValueError as e:
            raise TrainError(str(e)) from None

    # adapters
    lora_cfg = L.apply_lora(vcm, args) if (args.lora_rank or args.vision_lora_rank) else None
    if lora_cfg and plan.engine == "torch":
        from visualchat.lora import lora_parameters

        for p in lora_parameters(vcm).values():  # fp32 masters (peft follows the base layer's dtype)
            p.data = p.data.float()
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(vcm.lm)

    if args.embedding_lr == 0:
        vcm.embed_tokens.weight.requires_grad_(False)
    module = TrainModule(vcm, train_encoder=args.vision_lora_rank > 0)
    params = [p for p in module.parameters() if p.requires_grad]
    names_trainable = trainable_names(module)
    log.info("trainable: %d tensors, %s parameters (%s)", len(params), f"{sum(p.numel() for p in params):,}",
             ", ".join(sorted({n.split('.')[1] if n.startswith('vcm.') else n for n in names_trainable})))

    n_train = len(train_s)
    total = args.max_steps or max(1, math.ceil(args.epochs * n_train / plan.global_batch))
    warmup = warmup_steps(args, total)
    proj = [p for p in vcm.projection.parameters() if p.requires_grad]
    groups = [{"params": proj, "lr": args.lr if args.projection_lr is None else args.projection_lr}]
    rest = [p for p in params if p is not vcm.embed_tokens.weight and all(p is not q for q in proj)]
    if rest:  # LoRA adapters
        groups.append({"params": rest})
    if vcm.embed_tokens.weight.requires_grad:
        emb_lr = args.lr if args.embedding_lr is None else args.embedding_lr
        groups.append({"params": [vcm.embed_tokens.weight], "lr": emb_lr})
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=plan.betas, weight_decay=args.weight_decay, eps=1e-8)
    sched_total = [total]  # shortened in the loop under --fit_schedule_to_time
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sched_total, warmup, args.scheduler,
                                                             cycles=getattr(args, "scheduler_cycles", 1.0),
                                                             power=getattr(args, "scheduler_power", 1.0)))

    engine = None
    if plan.engine == "deepspeed":
        import deepspeed

        from visualchat.deepspeed_ops import StaleExtensionLock, disable_shm_comm_build, guard_extension_locks

        # training reduces through torch.distributed: DeepSpeed's shm all-reduce op (minutes to build) is never
        # needed; an op that must be built (e.g. cpu_adam) refuses a stale build lock instead of waiting forever
        disable_shm_comm_build()
        guard_extension_locks()
        cfg = deepspeed_config(args, plan)
        if is_main:
            with open(os.path.join(args.output_dir, "deepspeed_config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
        try:
            engine, opt, _, sched = deepspeed.initialize(model=module, optimizer=opt, model_parameters=params,
                                                         lr_scheduler=sched, config=cfg)
        except StaleExtensionLock as e:
            raise TrainError(str(e)) from None
    else:
        module.to(plan.device)

    zero3 = engine is not None and args.zero_stage == 3
    ckpt = Checkpointer(args.output_dir, keep=args.keep_checkpoints, rank=plan.rank,
                        meta=run_meta(args, plan.engine, plan.world), names=names_trainable)
    start_step, client = 0, {}
    if plan.resume_dir:
        start_step, client = ckpt.load(plan.resume_dir, module, opt, sched, engine)
        log.info("resumed from %s at step %d", plan.resume_dir, start_step)

    batcher = Batcher(train_s, plan.micro, plan.world, plan.rank, args.seed, cache, vcm.encoder, plan.device)
    val_batcher = Batcher(val_s, plan.micro, plan.world, plan.rank, args.seed, cache, vcm.encoder, plan.device)
    autocast = (torch.autocast(plan.device.type, dtype=torch.bfloat16)
                if args.precision == "bf16" and engine is None else contextlib.nullcontext())

    def run_forward(batch):
        with autocast if engine is None else contextlib.nullcontext():
            return (engine or module)(**batch)

    eval_seconds = [0.0]  # the last evaluation's duration (--fit_schedule_to_time keeps room for the final one)

    @torch.no_grad()
    def evaluate() -> float | None:
        if not val_s:
            return None
        t_eval = time.time()
        module.eval()
        eb = getattr(args, "eval_batch_size", 0) or plan.micro
        per_rank = math.ceil(len(val_s) / (plan.world * eb))
        tot = cnt = 0.0
        for i in range(per_rank):
            idx = [(i * plan.world + plan.rank) * eb + b for b in range(eb)]
            idx = [j for j in idx if j < len(val_s)]
            weight = 1.0
            if not idx:  # keep the ranks in step (ZeRO-3 gathers collectively): a dummy batch
                idx, weight = [0], 0.0
            batch = val_batcher.collate([val_s[j] for j in idx])
            batch.pop("n_tokens")
            loss, n = run_forward(batch)
            tot += float(loss) * n * weight
            cnt += n * weight
        module.train()
        tot, cnt = D.all_reduce_sum([tot, cnt])
        eval_seconds[0] = time.time() - t_eval
        return tot / max(cnt, 1.0)

    def export(path: str, extra_info: dict) -> None:
        config = config_for(vcm, lm_spec, max_images=args.max_images_per_sample, lora=lora_cfg,
                            info={**info_base(), **extra_info})
        export_checkpoint(vcm, path, config, zero3=zero3, rank=plan.rank)

    def info_base() -> dict:
        return {"hardware": hardware(), "processes": plan.world, "engine": plan.engine,
                "zero_stage": args.zero_stage if engine is not None else None, "precision": args.precision,
                "qlora": bool(args.qlora), "lora_rank": args.lora_rank, "vision_lora_rank": args.vision_lora_rank,
                "datasets": plan.names, "train_samples": n_train, "val_samples": len(val_s),
                "global_batch": plan.global_batch, "lr": args.lr, "seed": args.seed,
                "projection_init": args.projection_init, "grounding": grounding,
                "command": " ".join(["python -m train"] + list(getattr(args, "argv", []))),
                **({"init_from": args.init_from, "earlier_stages": earlier_stages(args.init_from)}
                   if args.init_from else {})}

    best = client.get("best_val", float("inf"))
    best_step = client.get("best_step")
    prog = Progress(args.output_dir, total, start_step, is_main and not args.no_progress, is_main,
                    tensorboard=args.tensorboard and is_main)
    tokens_seen = client.get("tokens_seen", 0)
    wall_before = client.get("wall_time_s", 0.0)
    t_loop = time.time()
    module.train()
    val_first = client.get("val_first")
    if start_step == 0 and val_s:
        val_first = evaluate()
        prog.log_val(0, val_first)
        if is_main:
            log.info("validation loss before training: %.4f", val_first)
    step = start_step
    last_val = client.get("last_val", val_first)
    stop_early = False
    fit_to_time = bool(args.fit_schedule_to_time and args.max_train_minutes)
    planned, next_fit, pace_from = total, 10, None  # pace measured from the 5th step (the first are slower)

    def fitted_total(done: int) -> int:
        """Steps that fit in the time budget at this run's pace so far (evaluations included), at
        least one more, at most the planned number; the same on every rank (rank 0's)."""
        now = time.time()
        left = 60 * args.max_train_minutes - wall_before - (now - t_loop) - eval_seconds[0]  # room for the last eval
        per_step = (now - pace_from[1]) / max(1, done - pace_from[0])
        est = max(done + 1, min(planned, done + int(0.97 * left / per_step)))
        return int(D.broadcast_object(est))

    train_stream = micro_batch_stream(batcher, start_step * plan.accum, max(0, total - start_step) * plan.accum,
                                      workers=getattr(args, "data_workers", 0),
                                      prefetch=getattr(args, "prefetch_factor", 2),
                                      pin_memory=plan.device.type == "cuda")
    while step < total:
        t0 = time.time()
        loss_sum = n_sum = tok = 0.0
        for a in range(plan.accum):
            batch = to_device_batch(next(train_stream), plan.device)  # micro-batch step * accum + a
            tok += batch.pop("n_tokens")
            loss, n = run_forward(batch)
            if engine is not None:
                engine.backward(loss)
                engine.step()
            else:
                (loss / plan.accum).backward()
            loss_sum += float(loss.detach()) * n
            n_sum += n
        if engine is None:
            if args.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        step += 1
        if fit_to_time and step - start_step == 5:
            pace_from = (step, time.time())
        if fit_to_time and step - start_step >= next_fit:
            next_fit *= 2
            new_total = fitted_total(step)
            if new_total != total:
                log.info("--fit_schedule_to_time: %d steps fit in --max_train_minutes %s (planned %d)", new_total,
                         args.max_train_minutes, planned)
                total = sched_total[0] = new_total
                prog.set_total(total)
        if args.max_train_minutes and (wall_before + time.time() - t_loop) > 60 * args.max_train_minutes and step < total:
            log.warning("--max_train_minutes %s reached at step %d of %d: stopping early (resume with a larger "
                        "budget to finish the schedule)", args.max_train_minutes, step, total)
            stop_early = True
        if args.sleep_per_step:
            time.sleep(args.sleep_per_step)
        loss_sum, n_sum, tok = D.all_reduce_sum([loss_sum, n_sum, tok])
        if not math.isfinite(loss_sum):  # the same all-reduced value on every rank: all stop together
            raise TrainError(f"training diverged: the loss is {loss_sum} at step {step} (lr {args.lr:g}); the run stops "
                             "here and its checkpoints so far are kept. Lower --lr, keep --grad_clip on, or check the "
                             "data and the projection's initialisation (--projection_init_scale)")
        tokens_seen += tok
        dt = time.time() - t0
        lr = sched.get_last_lr()[0] if hasattr(sched, "get_last_lr") else args.lr
        prog.log_train(step, loss_sum / max(n_sum, 1), lr, tok / max(dt, 1e-9), tokens_seen,
                       write=(step % max(1, args.log_every) == 0 or step == total))
        stop_early = D.broadcast_object(stop_early)
        if (args.eval_every and step % args.eval_every == 0) or step == total or stop_early:
            last_val = evaluate()
            if last_val is not None:
                prog.log_val(step, last_val)
                if last_val < best:
                    best, best_step = last_val, step
                    export(os.path.join(args.output_dir, "best"),
                           {"steps": step, "val_loss": last_val, "wall_time_s": round(wall_before + time.time() - t_loop, 1)})
        if (args.save_every and step % args.save_every == 0) or step == total or stop_early:
            ckpt.save(step, module, opt, sched, engine,
                      {"best_val": best, "best_step": best_step, "tokens_seen": tokens_seen, "val_first": val_first,
                       "last_val": last_val, "wall_time_s": wall_before + time.time() - t_loop})
        if stop_early:
            break
    prog.close()
    wall = wall_before + time.time() - t_loop
    summary = {"steps": step, "total_steps": total, "planned_steps": planned, "val_loss_first": val_first, "val_loss_last": last_val,
               "val_loss_best": best if best < float("inf") else None, "best_step": best_step,
               "tokens_seen": tokens_seen, "train_wall_time_s": round(wall, 1),
               "tokens_per_s": round(tokens_seen / max(wall, 1e-9), 1), "total_time_s": round(time.time() - t_start, 1),
               "data": stats.as_dict(), "grounding": grounding}
    export(os.path.join(args.output_dir, "final"), {"steps": step, "val_loss": last_val, "val_loss_first": val_first,
                                                    "wall_time_s": round(wall, 1), "tokens_seen": int(tokens_seen)})
    if is_main:
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        from .plots import plot_losses

        try:
            plot_losses(os.path.join(args.output_dir, "metrics.jsonl"), os.path.join(args.output_dir, "loss_curves.png"))
        except ImportError as e:
            log.warning("no loss plot: %s", e)
        log.info("done: %s", json.dumps(summary))
    D.barrier()
    return summary
