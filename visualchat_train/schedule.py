"""The learning-rate schedule: a linear warm-up, then one of the original's transformers schedulers
(``--scheduler``), as a multiplier of the peak lr for ``torch.optim.lr_scheduler.LambdaLR``."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import get_args

import torch

from .config import Scheduler

SCHEDULERS: tuple[str, ...] = get_args(Scheduler)


@dataclass
class LRSchedule:
    """The lr multiplier at a step. ``total`` may be changed while the schedule runs (the trainer
    shortens it under ``--fit_schedule_to_time``). After a linear warm-up of ``warmup`` steps:
    ``cosine`` / ``linear`` decay to 0, ``constant`` stays at 1, ``cosine_with_restarts`` runs
    ``cycles`` cosine decays each restarting at 1, ``polynomial`` is ``(1 - progress) ** power``
    (the original's transformers schedulers, with lr_end 0)."""

    total: int
    warmup: int
    kind: str
    cycles: float = 1.0
    power: float = 1.0

    def __post_init__(self):
        if self.kind not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.kind!r}; valid: {', '.join(SCHEDULERS)}")

    def __call__(self, step: int) -> float:
        warmup, kind = self.warmup, self.kind
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, self.total - warmup))
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "polynomial":
            return max(0.0, 1.0 - progress) ** self.power
        if kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1.0)))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_lambda(total: int, warmup: int, kind: str, *, cycles: float = 1.0, power: float = 1.0) -> LRSchedule:
    """The schedule as a callable ``step -> multiplier`` (see :class:`LRSchedule`)."""
    return LRSchedule(total, warmup, kind, cycles, power)


def lambda_lr(optimizer, schedule: LRSchedule) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` driven by ``schedule``. Through a plain function: LambdaLR would store a callable
    object's attributes in its state, and a resumed run would then take the saved ``total`` instead of
    its own flags'."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule(step))


def warmup_steps(cfg, total: int) -> int:
    """``--warmup_steps`` if given (at most ``total``), else ``--warmup_ratio`` of ``total``."""
    if cfg.warmup_steps is not None:
        return min(int(cfg.warmup_steps), total)
    return int(round(cfg.warmup_ratio * total))
