"""Everything decided before a model or a sample exists: :func:`preflight` checks the settings against
each other and the machine (raising :class:`~visualchat_train.errors.TrainError` with a message that names the
flag) and returns the run's :class:`Plan` (engine, processes, batch arithmetic, resume point);
:func:`deepspeed_config` is the DeepSpeed config that plan implies."""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
from dataclasses import dataclass, field
from typing import Any

import torch

from . import dist as D
from .config import TrainConfig
from .errors import TrainError
from .samples import check_datasets, parse_names

log = logging.getLogger("visualchat_train")


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


def preflight(cfg: TrainConfig) -> Plan:
    """Every check that needs no model and no data: raises TrainError with a clear message."""
    names = parse_names(cfg.dataset_names)
    try:
        check_datasets(names, cfg.data_path)
    except (ValueError, FileNotFoundError) as e:
        raise TrainError(str(e)) from None
    world = D.world_size()
    rank = D.rank()
    device = D.device()
    engine = cfg.engine
    if engine == "auto":
        engine = "deepspeed" if deepspeed_available() else "torch"
    if engine == "deepspeed" and not deepspeed_available():
        raise TrainError("--engine deepspeed but DeepSpeed is not installed (pip install deepspeed)")
    if engine == "torch":
        if world > 1:
            raise TrainError(f"the plain PyTorch engine runs one process; {world} were launched: use --engine deepspeed")
        if cfg.zero_stage:
            raise TrainError(f"--zero_stage {cfg.zero_stage} needs --engine deepspeed")
        if cfg.offload != "none":
            raise TrainError("--offload needs --engine deepspeed")
    micro = cfg.per_device_batch_size
    if micro < 1 or cfg.grad_accum_steps < 1:
        raise TrainError("--per_device_batch_size and --grad_accum_steps must be >= 1")
    accum = cfg.grad_accum_steps
    if cfg.global_batch_size:
        if cfg.global_batch_size % (micro * world):
            raise TrainError(f"--global_batch_size {cfg.global_batch_size} is not divisible by per_device_batch_size "
                             f"{micro} x {world} process(es) = {micro * world}")
        accum = cfg.global_batch_size // (micro * world)
        if cfg.grad_accum_steps not in (1, accum):
            raise TrainError(f"--grad_accum_steps {cfg.grad_accum_steps} disagrees with --global_batch_size "
                             f"{cfg.global_batch_size}, which at micro-batch {micro} x {world} process(es) needs "
                             f"accumulation {accum}: give one of them (a preset's global batch sets the accumulation)")
    override = {}
    if cfg.deepspeed_config:
        if not os.path.isfile(cfg.deepspeed_config):
            raise TrainError(f"--deepspeed_config {cfg.deepspeed_config!r} does not exist")
        with open(cfg.deepspeed_config) as f:
            try:
                override = json.load(f)
            except json.JSONDecodeError as e:
                raise TrainError(f"--deepspeed_config {cfg.deepspeed_config}: not valid JSON: {e}") from None
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
    if cfg.precision == "auto":  # resolved once, here, so everything after sees what runs
        cfg.precision = "bf16" if bf16_supported(device) else "fp32"
        log.info("--precision auto: %s on this %s", cfg.precision, device.type.upper())
    if cfg.precision == "fp16" and device.type != "cuda":
        raise TrainError("--precision fp16 needs a CUDA GPU (loss scaling on CPU is not supported); use bf16 or fp32")
    if cfg.precision == "bf16" and not bf16_supported(device):
        raise TrainError(f"--precision bf16 is not supported on this {device.type.upper()} "
                         f"({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'CPU'}); use fp32"
                         + (" or fp16" if device.type == "cuda" else ""))
    if cfg.qlora:
        if cfg.lora_rank <= 0:
            raise TrainError("--qlora trains LoRA adapters on a 4-bit base: give --lora_rank > 0")
        if cfg.zero_stage == 3:
            raise TrainError("--qlora with ZeRO-3 is not supported (4-bit weights cannot be partitioned); use --zero_stage 2")
        from .lora import qlora_unsupported_reason

        why = qlora_unsupported_reason()
        if why:
            raise TrainError(f"--qlora: {why}")
    if cfg.lora_rank < 0 or cfg.vision_lora_rank < 0:
        raise TrainError("LoRA ranks must be >= 0")
    if cfg.max_seq_len < 8:
        raise TrainError("--max_seq_len must be >= 8")
    if cfg.eval_every < 0 or cfg.save_every < 0:
        raise TrainError("--eval_every and --save_every must be >= 0")
    if not (math.isfinite(cfg.projection_init_scale) and cfg.projection_init_scale > 0):
        raise TrainError("--projection_init_scale must be a positive number (0, every image token exactly zero, "
                         f"made bf16 training diverge), got {cfg.projection_init_scale}")
    if cfg.embedding_lr is not None and not (math.isfinite(cfg.embedding_lr) and cfg.embedding_lr >= 0):
        raise TrainError(f"--embedding_lr must be a number >= 0 (0 freezes the embedding), got {cfg.embedding_lr}")
    if cfg.feature_workers < 0:
        raise TrainError(f"--feature_workers must be >= 0 (0: automatic), got {cfg.feature_workers}")
    if cfg.projection_lr is not None and not (math.isfinite(cfg.projection_lr) and cfg.projection_lr >= 0):
        raise TrainError(f"--projection_lr must be a number >= 0, got {cfg.projection_lr}")
    if not 0 <= cfg.val_ratio < 1:
        raise TrainError("--val_ratio must be in [0, 1)")
    if cfg.warmup_steps is not None and cfg.warmup_steps < 0:
        raise TrainError(f"--warmup_steps must be >= 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.warmup_ratio <= 1:
        raise TrainError(f"--warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if cfg.data_workers < 0 or cfg.prefetch_factor < 1:
        raise TrainError("--data_workers must be >= 0 and --prefetch_factor >= 1")
    if cfg.eval_batch_size < 0:
        raise TrainError(f"--eval_batch_size must be >= 0 (0: --per_device_batch_size), got {cfg.eval_batch_size}")
    if cfg.scheduler_cycles <= 0 or cfg.scheduler_power <= 0:
        raise TrainError("--scheduler_cycles and --scheduler_power must be > 0")
    for flag, allow_all in (("blend_llava_per_image", False), ("blend_cgd_questions", True)):
        try:
            from .samples import parse_draw

            parse_draw(getattr(cfg, flag), "--" + flag, allow_all)
        except ValueError as e:
            raise TrainError(str(e)) from None
    betas = parse_betas(cfg.adam_betas)
    from .resume import find_resume, check_meta

    resume_dir = find_resume(cfg.resume, cfg.output_dir)
    if resume_dir is not None:
        check_meta(resume_dir, run_meta(cfg, engine, world))
    return Plan(engine, world, rank, device, micro, accum, micro * accum * world, betas, names, override, resume_dir)


def run_meta(cfg: TrainConfig, engine: str, world: int) -> dict:
    """What a resumable checkpoint must agree with to be resumed."""
    return {"lm": cfg.lm, "vision": cfg.vision, "attention": cfg.attention, "engine": engine,
            "zero_stage": cfg.zero_stage if engine == "deepspeed" else None, "world_size": world,
            "lora_rank": cfg.lora_rank, "vision_lora_rank": cfg.vision_lora_rank, "qlora": bool(cfg.qlora),
            "precision": cfg.precision}


@functools.lru_cache(maxsize=8)
def _zero3_live_settings(lm: str) -> tuple[tuple[str, int], ...]:
    """ZeRO-3's gathering limits from the LM's shape (:func:`visualchat_train.memory.zero3_live_settings`: a few
    layers' worth instead of DeepSpeed's 10^9 parameters); none (DeepSpeed's defaults) where the LM's
    config cannot be read without loading it."""
    from . import memory

    try:
        shape = memory.lm_shape(lm)
    except SystemExit as e:
        log.warning("ZeRO-3 gathering limits left at DeepSpeed's defaults: %s", e)
        return ()
    return tuple(memory.zero3_live_settings(shape).items())


def deepspeed_config(cfg: TrainConfig, plan: Plan) -> dict:
    """The DeepSpeed config of this run (batch sizes, ZeRO stage and offload, precision, clipping), with
    ``--deepspeed_config``'s keys merged over it."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero.update(_zero3_live_settings(cfg.lm))
    if cfg.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    cfg = {
        "train_micro_batch_size_per_gpu": plan.micro,
        "gradient_accumulation_steps": plan.accum,
        "train_batch_size": plan.global_batch,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "fp16": {"enabled": cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(dict(a.get(k) or {}), v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    return merge(cfg, plan.ds_config_override)
