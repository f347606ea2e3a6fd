"""The training run, top to bottom: :func:`train` checks the settings (:func:`~visualchat_train.preflight.preflight`),
takes the output directory's lock and runs a :class:`Trainer`, whose :meth:`~Trainer.setup` builds the
model (:func:`visualchat_train.model.build_model`), the samples, the feature cache, the adapters, the optimiser, the lr
schedule and the engine (:mod:`visualchat_train.engine`: DeepSpeed or plain PyTorch, one interface), and whose
:meth:`~Trainer.fit` loop runs :meth:`~Trainer.step`, :meth:`~Trainer.evaluate`, :meth:`~Trainer.export`
(the app's checkpoint format) and :meth:`~Trainer.save` (resumable state, :mod:`visualchat_train.resume`).

Only ``projection``, ``embed_tokens`` and LoRA weights (when on) are trainable and given to the
optimiser; the LM and the encoder stay frozen (in ZeRO-3 they are still partitioned: the whole
module goes to DeepSpeed, only the trainable parameters to the optimiser).
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch

from visualchat.model import config_for

from . import dist as D
from .batches import Batcher, MicroBatches, micro_batch_stream, to_device_batch  # noqa: F401 - re-exported
from .config import TrainConfig
from .engine import DeepSpeedEngine, Engine, TorchEngine
from .errors import TrainError
from .export import export_checkpoint
from .lock import OutputDirLocked, OutputLock
from .model import (TrainModule, build_model, enable_gradient_checkpointing, gathered_base,  # noqa: F401
                    load_dtype, partitioned_load, zero3_init_enabled)
from .preflight import (Plan, bf16_supported, deepspeed_available, deepspeed_config, parse_betas,  # noqa: F401
                        preflight, run_meta)
from .progress import Progress
from .resume import Checkpointer, trainable_names
from .samples import GENERATED, build_samples_from_config
from .schedule import SCHEDULERS, LRSchedule, lambda_lr, lr_lambda, warmup_steps  # noqa: F401 - re-exported

log = logging.getLogger("visualchat_train")


# -- the run -----------------------------------------------------------------------------------
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


def feature_cache_root(cfg: TrainConfig, names: list[str]) -> str | None:
    from visualchat.assets import cache_dir

    v = str(cfg.feature_cache)
    if v == "off" or cfg.vision_lora_rank > 0:
        return None
    if v == "auto":
        return os.path.join(cache_dir(), "features") if all(n in GENERATED for n in names) else None
    if v == "on":
        return os.path.join(cache_dir(), "features")
    return v


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for name in ("visualchat_train", "visualchat_train.data", "visualchat_train.samples"):
        logging.getLogger(name).setLevel(level)


def build_optimizer(vcm, params: list, cfg: TrainConfig, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the projection (``--projection_lr``), LoRA adapters (``--lr``)
    and the embedding (``--embedding_lr``), each its own group."""
    proj = [p for p in vcm.projection.parameters() if p.requires_grad]
    groups = [{"params": proj, "lr": cfg.lr if cfg.projection_lr is None else cfg.projection_lr}]
    rest = [p for p in params if p is not vcm.embed_tokens.weight and all(p is not q for q in proj)]
    if rest:  # LoRA adapters
        groups.append({"params": rest})
    if vcm.embed_tokens.weight.requires_grad:
        emb_lr = cfg.lr if cfg.embedding_lr is None else cfg.embedding_lr
        groups.append({"params": [vcm.embed_tokens.weight], "lr": emb_lr})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, eps=1e-8)


@dataclass
class StepResult:
    """One optimiser step, summed over every rank: mean loss per label token, and the tokens seen."""

    loss: float
    tokens: float


class Trainer:
    """One training run: :meth:`setup` builds the model, the data, the engine and the bookkeeping;
    :meth:`fit` runs the loop (:meth:`step`, then :meth:`evaluate`, :meth:`export` of the best and
    :meth:`save` of resumable state when due) and writes the final checkpoint and the summary."""

    def __init__(self, cfg: TrainConfig, plan: Plan, t_start: float | None = None):
        self.cfg, self.plan = cfg, plan
        self.t_start = time.time() if t_start is None else t_start
        self.is_main = plan.rank == 0

    # -- set-up --------------------------------------------------------------------------------
    def setup(self) -> "Trainer":
        cfg, plan = self.cfg, self.plan
        if plan.engine == "deepspeed" or D.launched():
            D.init()
        os.makedirs(cfg.output_dir, exist_ok=True)
        log.info("engine %s, %d process(es), device %s, micro-batch %d x accumulation %d = %d samples per step",
                 plan.engine, plan.world, plan.device, plan.micro, plan.accum, plan.global_batch)
        self.ds_config = deepspeed_config(cfg, plan) if plan.engine == "deepspeed" else None  # computed once
        self.vcm, self.tokenizer, self.lm_spec = build_model(cfg, plan, self.ds_config)
        self._setup_data()
        self._setup_feature_cache()
        self._setup_grounding()
        self._setup_adapters()
        self._setup_engine()
        self._setup_state()
        return self

    def _setup_data(self) -> None:
        from visualchat.template import Template

        cfg = self.cfg
        self.template = Template(self.tokenizer, self.vcm.image_tokens)
        try:
            self.train_s, self.val_s, self.stats = build_samples_from_config(cfg, self.plan.names, self.template)
        except (ValueError, FileNotFoundError) as e:
            raise TrainError(str(e)) from None
        log.info("data: %s", self.stats.as_dict())
        if cfg.data_debug_path and self.is_main:
            from .samples import dump_debug_samples

            n_dumped = dump_debug_samples(self.train_s, self.template, cfg.data_debug_path)
            log.info("--data_debug_path: wrote %d samples to %s", n_dumped, cfg.data_debug_path)

    def _setup_feature_cache(self) -> None:
        """The frozen encoder's features, computed once (each node fills its own cache; its local ranks
        share the work, so no shared disk is needed). Samples with an image that does not open go."""
        from .features import FeatureCache, image_key

        cfg, encoder = self.cfg, self.vcm.encoder
        self.cache = None
        root = feature_cache_root(cfg, self.plan.names)
        if root is None:
            return
        self.cache = FeatureCache(root, encoder)
        refs = [r for s in self.train_s + self.val_s for r in s.images]
        t0 = time.time()
        workers = cfg.feature_workers or min(8, max(1, (os.cpu_count() or 1) - 1))
        bad = self.cache.fill(encoder, refs, rank=D.local_rank(), world=D.local_world_size(),
                              progress=self.is_main and not cfg.no_progress, workers=workers)
        D.barrier()
        bad = {k: v for part in D.all_gather_object(bad) for k, v in part.items()}
        if bad:
            for k, err in bad.items():
                log.warning("skipping samples with bad image %s: %s", k, err)
            keep = lambda s: all(image_key(r) not in bad for r in s.images)  # noqa: E731
            n0 = len(self.train_s) + len(self.val_s)
            self.train_s, self.val_s = [s for s in self.train_s if keep(s)], [s for s in self.val_s if keep(s)]
            self.stats.add("skipped_bad_image", n0 - len(self.train_s) - len(self.val_s))
        log.info("feature cache %s ready in %.1f s", self.cache.dir, time.time() - t0)

    def _setup_grounding(self) -> None:
        """``--projection_init grounded``: the projection fitted by least squares before the first step."""
        cfg = self.cfg
        self.grounding = None
        if cfg.projection_init == "grounded" and not (cfg.init_from or self.plan.resume_dir):
            from .grounding import ground_projection

            try:
                with gathered_base(self.vcm, cfg, self.plan):  # a ZeRO-3 load partitioned the LM's embedding
                    self.grounding = ground_projection(self.vcm, self.tokenizer, self.train_s, self.cache)
            except ValueError as e:
                raise TrainError(str(e)) from None

    def _continue_lora(self) -> None:
        """A run started ``--init_from`` a checkpoint with LoRA factors continues them: the run must ask
        for the same adapters (rank, targets, layers), else it stops with the difference; a run without
        LoRA starting from one with it is refused too (its factors would silently be dropped)."""
        from visualchat.lora import PREFIX, copy_lora

        init = {k: v for k, v in (getattr(self.vcm, "init_lora", None) or {}).items() if k.startswith(PREFIX)}
        if not init:
            return
        if not self.lora_cfg:
            raise TrainError(f"--init_from {self.cfg.init_from!r} holds LoRA adapters; continue them with the same "
                             "--lora_rank/--lora_layers/--lora_target_modules it was trained with")
        try:
            n = copy_lora(self.vcm, init)
        except ValueError as e:
            raise TrainError(f"--init_from {self.cfg.init_from!r}: its LoRA adapters differ from this run's: {e}") from None
        log.info("continuing %d LoRA tensors from %s", n, self.cfg.init_from)

    def _setup_adapters(self) -> None:
        """LoRA adapters (when asked), gradient checkpointing, and what the optimiser gets."""
        from . import lora as L

        cfg, vcm = self.cfg, self.vcm
        self.lora_cfg = L.apply_lora(vcm, cfg) if (cfg.lora_rank or cfg.vision_lora_rank) else None
        if self.lora_cfg and self.plan.engine == "torch":
            from visualchat.lora import lora_parameters

            for p in lora_parameters(vcm).values():  # fp32 masters (peft follows the base layer's dtype)
                p.data = p.data.float()
        self._continue_lora()  # after the fp32 masters exist, so the factors are copied at full precision
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(vcm.lm)
        if cfg.embedding_lr == 0:
            vcm.embed_tokens.weight.requires_grad_(False)
        if (cfg.aux_loss or cfg.aux_only) and vcm.projection.kind != "words":
            raise TrainError(f"--aux_loss trains the heads of the 'words' projection; --vis_proj is {cfg.vis_proj!r}")
        if cfg.aux_only and (cfg.lora_rank or cfg.vision_lora_rank):
            raise TrainError("--aux_only trains the projection's heads alone: drop --lora_rank/--vision_lora_rank")
        self.module = TrainModule(vcm, train_encoder=cfg.vision_lora_rank > 0, aux_loss=cfg.aux_loss,
                                  detach_image_rows=cfg.detach_image_rows, aux_only=cfg.aux_only)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.trainable = trainable_names(self.module)
        log.info("trainable: %d tensors, %s parameters (%s)", len(self.params),
                 f"{sum(p.numel() for p in self.params):,}",
                 ", ".join(sorted({n.split('.')[1] if n.startswith('vcm.') else n for n in self.trainable})))

    def _setup_engine(self) -> None:
        """The step count, the optimiser and the lr schedule, handed to the engine the plan names."""
        cfg, plan = self.cfg, self.plan
        self.total = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(self.train_s) / plan.global_batch))
        self.planned = self.total
        opt = build_optimizer(self.vcm, self.params, cfg, plan.betas)
        self.schedule = lr_lambda(self.total, warmup_steps(cfg, self.total), cfg.scheduler,
                                  cycles=cfg.scheduler_cycles, power=cfg.scheduler_power)
        sched = lambda_lr(opt, self.schedule)
        if plan.engine == "deepspeed":
            if self.is_main:
                with open(os.path.join(cfg.output_dir, "deepspeed_config.json"), "w") as f:
                    json.dump(self.ds_config, f, indent=2)
            self.engine: Engine = DeepSpeedEngine(self.module, self.params, opt, sched, self.ds_config,
                                                  partitioned=cfg.zero_stage == 3)
        else:
            self.engine = TorchEngine(self.module, self.params, opt, sched, plan.device, plan.accum, cfg.grad_clip,
                                      bf16=cfg.precision == "bf16")

    def _setup_state(self) -> None:
        """Resumable checkpoints (and the resume itself), the batchers, the progress log."""
        cfg, plan = self.cfg, self.plan
        self.checkpointer = Checkpointer(cfg.output_dir, keep=cfg.keep_checkpoints, rank=plan.rank,
                                         meta=run_meta(cfg, plan.engine, plan.world), names=self.trainable)
        self.global_step, client = 0, {}
        if plan.resume_dir:
            self.global_step, client = self.engine.load(self.checkpointer, plan.resume_dir)
            log.info("resumed from %s at step %d", plan.resume_dir, self.global_step)
        self.start_step = self.global_step
        self.best = client.get("best_val", float("inf"))
        self.best_step = client.get("best_step")
        self.tokens_seen = client.get("tokens_seen", 0)
        self.wall_before = client.get("wall_time_s", 0.0)  # training time of the runs this one resumes
        self.t_loop = time.time()  # (fit starts the clock again)
        self.val_first = client.get("val_first")
        self.last_val = client.get("last_val", self.val_first)
        self.eval_seconds = 0.0  # the last evaluation's duration (--fit_schedule_to_time keeps room for one)
        self.batcher = Batcher(self.train_s, plan.micro, plan.world, plan.rank, cfg.seed, self.cache,
                               self.vcm.encoder, plan.device)
        self.val_batcher = Batcher(self.val_s, plan.micro, plan.world, plan.rank, cfg.seed, self.cache,
                                   self.vcm.encoder, plan.device)
        self.progress = Progress(cfg.output_dir, self.total, self.global_step, self.is_main and not cfg.no_progress,
                                 self.is_main, tensorboard=cfg.tensorboard and self.is_main)

    # -- the steps -----------------------------------------------------------------------------
    def step(self, micro_batches) -> StepResult:
        """One optimiser step over the next ``accum`` micro-batches of ``micro_batches``; the loss and
        the token count are summed over every rank, and a loss that is not finite stops the run."""
        plan = self.plan
        loss_sum = n_sum = tok = 0.0
        for _ in range(plan.accum):
            batch = to_device_batch(next(micro_batches), plan.device)
            tok += batch.pop("n_tokens")
            loss, n = self.engine.forward(batch)
            self.engine.backward(loss)
            loss_sum += float(loss.detach()) * n
            n_sum += n
        self.engine.step()
        self.global_step += 1
        return self._reduce(loss_sum, n_sum, tok)

    def _reduce(self, loss_sum: float, n_sum: float, tok: float) -> StepResult:
        loss_sum, n_sum, tok = D.all_reduce_sum([loss_sum, n_sum, tok])
        if not math.isfinite(loss_sum):  # the same all-reduced value on every rank: all stop together
            raise TrainError(f"training diverged: the loss is {loss_sum} at step {self.global_step} (lr "
                             f"{self.cfg.lr:g}); the run stops here and its checkpoints so far are kept. Lower --lr, "
                             "keep --grad_clip on, or check the data and the projection's initialisation "
                             "(--projection_init_scale)")
        return StepResult(loss_sum / max(n_sum, 1), tok)

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """The validation loss per label token over every rank's share of the validation samples."""
        val_s, plan = self.val_s, self.plan
        if not val_s:
            return None
        t_eval = time.time()
        self.engine.eval()
        eb = self.cfg.eval_batch_size or plan.micro
        per_rank = math.ceil(len(val_s) / (plan.world * eb))
        tot = cnt = 0.0
        for i in range(per_rank):
            idx = [(i * plan.world + plan.rank) * eb + b for b in range(eb)]
            idx = [j for j in idx if j < len(val_s)]
            weight = 1.0
            if not idx:  # keep the ranks in step (ZeRO-3 gathers collectively): a dummy batch
                idx, weight = [0], 0.0
            batch = self.val_batcher.collate([val_s[j] for j in idx])
            batch.pop("n_tokens")
            if not self.cfg.aux_only:
                batch.pop("image_labels", None)  # the validation loss is the answers' alone
            loss, n = self.engine.forward(batch)
            tot += float(loss) * n * weight
            cnt += n * weight
        self.engine.train()
        tot, cnt = D.all_reduce_sum([tot, cnt])
        self.eval_seconds = time.time() - t_eval
        return tot / max(cnt, 1.0)

    def save(self) -> str:
        """A resumable checkpoint of this step (collective)."""
        return self.engine.save(self.checkpointer, self.global_step, {
            "best_val": self.best, "best_step": self.best_step, "tokens_seen": self.tokens_seen,
            "val_first": self.val_first, "last_val": self.last_val, "wall_time_s": self.wall_time()})

    def export(self, name: str, extra_info: dict) -> None:
        """The model in the app's checkpoint format under ``output_dir/name`` (collective under ZeRO-3)."""
        config = config_for(self.vcm, self.lm_spec, max_images=self.cfg.max_images_per_sample, lora=self.lora_cfg,
                            info={**self.info(), **extra_info})
        export_checkpoint(self.vcm, os.path.join(self.cfg.output_dir, name), config,
                          zero3=self.engine.partitioned, rank=self.plan.rank, engine=getattr(self.engine, "ds", None))

    def info(self) -> dict:
        """The provenance every exported checkpoint records."""
        cfg, plan = self.cfg, self.plan
        return {"hardware": hardware(), "processes": plan.world, "engine": plan.engine,
                "zero_stage": cfg.zero_stage if plan.engine == "deepspeed" else None, "precision": cfg.precision,
                "qlora": bool(cfg.qlora), "lora_rank": cfg.lora_rank, "vision_lora_rank": cfg.vision_lora_rank,
                "datasets": plan.names, "train_samples": len(self.train_s), "val_samples": len(self.val_s),
                "global_batch": plan.global_batch, "lr": cfg.lr, "seed": cfg.seed,
                "projection_init": cfg.projection_init, "grounding": self.grounding,
                "command": " ".join(["python -m visualchat_train"] + list(cfg.argv)),
                **({"init_from": cfg.init_from, "earlier_stages": earlier_stages(cfg.init_from)}
                   if cfg.init_from else {})}

    def wall_time(self) -> float:
        """Seconds of training so far, the resumed runs' included."""
        return self.wall_before + time.time() - self.t_loop

    # -- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to the end of the schedule (or of the time budget); returns the summary."""
        cfg = self.cfg
        self.t_loop = time.time()
        self.engine.train()
        if self.global_step == 0 and self.val_s:
            self.val_first = self.evaluate()
            self.progress.log_val(0, self.val_first)
            if self.is_main:
                log.info("validation loss before training: %.4f", self.val_first)
        self._next_fit, self._pace_from = 10, None  # pace measured from the 5th step (the first are slower)
        stream = micro_batch_stream(self.batcher, self.global_step * self.plan.accum,
                                    max(0, self.total - self.global_step) * self.plan.accum,
                                    workers=cfg.data_workers, prefetch=cfg.prefetch_factor,
                                    pin_memory=self.plan.device.type == "cuda")
        while self.global_step < self.total:
            t0 = time.time()
            result = self.step(stream)
            step = self.global_step
            self._fit_schedule_to_time()
            stop_early = self._out_of_time()
            if cfg.sleep_per_step:
                time.sleep(cfg.sleep_per_step)
            self.tokens_seen += result.tokens
            self.progress.log_train(step, result.loss, self.engine.lr(cfg.lr), result.tokens / max(time.time() - t0, 1e-9),
                                    self.tokens_seen, write=(step % max(1, cfg.log_every) == 0 or step == self.total))
            stop_early = D.broadcast_object(stop_early)
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == self.total or stop_early:
                self.last_val = self.evaluate()
                if self.last_val is not None:
                    self.progress.log_val(step, self.last_val)
                    if self.last_val < self.best:
                        self.best, self.best_step = self.last_val, step
                        self.export("best", {"steps": step, "val_loss": self.last_val,
                                             "wall_time_s": round(self.wall_time(), 1)})
            if (cfg.save_every and step % cfg.save_every == 0) or step == self.total or stop_early:
                self.save()
            if stop_early:
                break
        self.progress.close()
        return self._finish()

    def _fit_schedule_to_time(self) -> None:
        """``--fit_schedule_to_time``: after 10, 20, 40, ... steps, shorten the schedule to the steps that
        fit in ``--max_train_minutes`` at this run's pace (evaluations included; the same on every rank)."""
        cfg = self.cfg
        if not (cfg.fit_schedule_to_time and cfg.max_train_minutes):
            return
        done = self.global_step - self.start_step
        if done == 5:
            self._pace_from = (self.global_step, time.time())
        if done < self._next_fit:
            return
        self._next_fit *= 2
        now = time.time()
        left = 60 * cfg.max_train_minutes - self.wall_time() - self.eval_seconds  # room for the last evaluation
        per_step = (now - self._pace_from[1]) / max(1, self.global_step - self._pace_from[0])
        est = max(self.global_step + 1, min(self.planned, self.global_step + int(0.97 * left / per_step)))
        new_total = int(D.broadcast_object(est))  # rank 0's
        if new_total != self.total:
            log.info("--fit_schedule_to_time: %d steps fit in --max_train_minutes %s (planned %d)", new_total,
                     cfg.max_train_minutes, self.planned)
            self.total = self.schedule.total = new_total
            self.progress.set_total(new_total)

    def _out_of_time(self) -> bool:
        cfg = self.cfg
        if cfg.max_train_minutes and self.wall_time() > 60 * cfg.max_train_minutes and self.global_step < self.total:
            log.warning("--max_train_minutes %s reached at step %d of %d: stopping early (resume with a larger "
                        "budget to finish the schedule)", cfg.max_train_minutes, self.global_step, self.total)
            return True
        return False

    def _finish(self) -> dict:
        """The final export, ``summary.json`` and the loss plot; returns the summary."""
        wall = self.wall_time()
        summary = {"steps": self.global_step, "total_steps": self.total, "planned_steps": self.planned,
                   "val_loss_first": self.val_first, "val_loss_last": self.last_val,
                   "val_loss_best": self.best if self.best < float("inf") else None, "best_step": self.best_step,
                   "tokens_seen": self.tokens_seen, "train_wall_time_s": round(wall, 1),
                   "tokens_per_s": round(self.tokens_seen / max(wall, 1e-9), 1),
                   "total_time_s": round(time.time() - self.t_start, 1),
                   "data": self.stats.as_dict(), "grounding": self.grounding}
        self.export("final", {"steps": self.global_step, "val_loss": self.last_val, "val_loss_first": self.val_first,
                              "wall_time_s": round(wall, 1), "tokens_seen": int(self.tokens_seen)})
        if self.is_main:
            out = self.cfg.output_dir
            with open(os.path.join(out, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
            from .plots import plot_losses

            try:
                plot_losses(os.path.join(out, "metrics.jsonl"), os.path.join(out, "loss_curves.png"))
            except ImportError as e:
                log.warning("no loss plot: %s", e)
            log.info("done: %s", json.dumps(summary))
        D.barrier()
        return summary


def train(cfg: TrainConfig) -> dict:
    """Run a whole training; returns a summary (also written to output_dir/summary.json)."""
    t_start = time.time()
    setup_logging(D.rank())
    plan = preflight(cfg)  # every check that needs no model and no data, before any set-up
    lock = OutputLock(cfg.output_dir)
    if plan.rank == 0:  # one run per output directory (rank 0 holds it for the whole job)
        try:
            lock.acquire()
        except OutputDirLocked as e:
            raise TrainError(str(e)) from None
    try:
        return Trainer(cfg, plan, t_start).setup().fit()
    finally:
        lock.release()
