"""The training engine behind one small interface, so the trainer's loop has no engine branches.

:class:`TorchEngine` is the plain PyTorch step (one process; bf16 under autocast when asked; the
gradient is accumulated over the micro-batches, clipped, then AdamW and the schedule step).
:class:`DeepSpeedEngine` hands the same module, optimiser and schedule to ``deepspeed.initialize``
(ZeRO 0-3, any number of processes; DeepSpeed does the accumulation, clipping and loss scaling).

Both take micro-batches as the trainer collates them and give back what the :class:`TrainModule`
returns, ``(loss, n_label_tokens)``; both save and load resumable state through
:class:`visualchat_train.resume.Checkpointer`.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import TrainError


class Engine:
    """What the trainer needs of an engine.

    - :meth:`forward` runs one micro-batch (in the engine's precision);
    - :meth:`backward` takes one micro-batch's loss; :meth:`step` ends an optimiser step (after the
      accumulation's micro-batches);
    - :meth:`lr` is the current learning rate; :meth:`save` / :meth:`load` write and read resumable state.
    """

    #: parameters are partitioned over the ranks (ZeRO-3): exporting them gathers them collectively
    partitioned = False

    def __init__(self, module: nn.Module, optimizer, scheduler):
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler

    def forward(self, batch: dict):
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def lr(self, default: float) -> float:
        sched = self.scheduler
        return sched.get_last_lr()[0] if hasattr(sched, "get_last_lr") else default

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def _native(self):
        """The engine object :class:`visualchat_train.resume.Checkpointer` saves through (None: plain files)."""
        return None

    def save(self, checkpointer, step: int, client: dict) -> str:
        return checkpointer.save(step, self.module, self.optimizer, self.scheduler, self._native(), client)

    def load(self, checkpointer, path: str) -> tuple[int, dict]:
        return checkpointer.load(path, self.module, self.optimizer, self.scheduler, self._native())


class TorchEngine(Engine):
    """Plain PyTorch on one process: the gradient of ``accum`` micro-batches is averaged, clipped to
    ``grad_clip`` (0: off), then the optimiser and the schedule step. ``bf16``: forward under autocast."""

    def __init__(self, module: nn.Module, params: list, optimizer, scheduler, device: torch.device, accum: int,
                 grad_clip: float, bf16: bool):
        super().__init__(module, optimizer, scheduler)
        self.params, self.accum, self.grad_clip = params, accum, grad_clip
        self.bf16, self.device_type = bf16, device.type
        module.to(device)

    def forward(self, batch: dict):
        ctx = torch.autocast(self.device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            return self.module(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with the run's config (``ds_config``): DeepSpeed steps the optimiser and
    the schedule itself at the end of each accumulation, so :meth:`step` has nothing left to do.
    ``partitioned``: ZeRO-3 (the parameters live in shards)."""

    def __init__(self, module: nn.Module, params: list, optimizer, scheduler, ds_config: dict, partitioned: bool):
        import deepspeed

        from visualchat.deepspeed_ops import StaleExtensionLock, disable_shm_comm_build, guard_extension_locks

        # training reduces through torch.distributed: DeepSpeed's shm all-reduce op (minutes to build) is never
        # needed; an op that must be built (e.g. cpu_adam) refuses a stale build lock instead of waiting forever
        disable_shm_comm_build()
        guard_extension_locks()
        try:
            self.ds, optimizer, _, scheduler = deepspeed.initialize(
                model=module, optimizer=optimizer, model_parameters=params, lr_scheduler=scheduler, config=ds_config)
        except StaleExtensionLock as e:
            raise TrainError(str(e)) from None
        super().__init__(module, optimizer, scheduler)
        self.partitioned = partitioned

    def forward(self, batch: dict):
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)
        self.ds.step()  # an optimiser step only at the accumulation boundary (DeepSpeed counts)

    def step(self) -> None:
        pass

    def _native(self):
        return self.ds
