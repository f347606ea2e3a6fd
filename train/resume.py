"""Resumable training state, written atomically: everything goes to ``checkpoints/.tmp-step-N`` (all
ranks), then rank 0 writes ``complete.json`` and renames the folder to ``checkpoints/step-N``. A kill
at any moment leaves the previous complete checkpoint untouched; ``--resume auto`` takes the newest
folder that has ``complete.json``.

State: the trainable weights, optimiser and scheduler (the DeepSpeed engine's own checkpoint with
``exclude_frozen_parameters``, or ``state.pt`` for the plain engine), the step (which fixes the data
order, see ``trainer.Batcher``), per-rank RNG states and the run's bookkeeping (best loss, tokens).
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil

import numpy as np
import torch

from . import dist as D

COMPLETE = "complete.json"
DS_TAG = "ds"
_STEP = re.compile(r"^step-(\d+)$")


class ResumeError(ValueError):
    pass


def _error(msg: str):
    from .trainer import TrainError

    return TrainError(msg)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def newest_complete(root: str) -> str | None:
    best, best_step = None, -1
    for d in glob.glob(os.path.join(root, "step-*")):
        m = _STEP.match(os.path.basename(d))
        if m and is_complete(d) and int(m.group(1)) > best_step:
            best, best_step = d, int(m.group(1))
    return best


def find_resume(spec: str | None, output_dir: str) -> str | None:
    """``auto`` -> the newest complete checkpoint under ``output_dir/checkpoints`` (None if there is
    none); ``none`` -> None; a path -> that checkpoint (checked)."""
    if spec in (None, "", "none"):
        return None
    if spec == "auto":
        return newest_complete(os.path.join(output_dir, "checkpoints"))
    path = spec
    if os.path.isdir(path) and not is_complete(path) and os.path.isdir(os.path.join(path, "checkpoints")):
        path = newest_complete(os.path.join(path, "checkpoints")) or path  # an output_dir was given
    if not os.path.isdir(path):
        raise _error(f"--resume {spec!r}: no such checkpoint directory")
    if not is_complete(path):
        raise _error(f"--resume {spec!r} is not a complete training checkpoint (no {COMPLETE}); "
                     "it may have been cut off while saving")
    return path


def read_info(path: str) -> dict:
    with open(os.path.join(path, COMPLETE)) as f:
        return json.load(f)


def check_meta(path: str, meta: dict) -> None:
    """Raise TrainError naming every setting where the checkpoint differs from this run."""
    saved = read_info(path).get("meta", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in meta.items() if saved.get(k) != v]
    if diffs:
        raise _error(f"--resume {path} does not match this run ({'; '.join(diffs)}); "
                     "use the same flags, another --output_dir, or --resume none")


def trainable_names(module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class Checkpointer:
    def __init__(self, output_dir: str, keep: int, rank: int, meta: dict, names: list[str]):
        self.root = os.path.join(output_dir, "checkpoints")
        self.keep = max(1, keep)
        self.rank = rank
        self.meta = meta
        self.names = names

    def save(self, step: int, module, opt, sched, engine, client: dict) -> str:
        final = os.path.join(self.root, f"step-{step:08d}")
        tmp = os.path.join(self.root, f".tmp-step-{step:08d}")
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            for old in glob.glob(os.path.join(self.root, ".tmp-step-*")):  # left by a kill
                shutil.rmtree(old, ignore_errors=True)
            os.makedirs(tmp)
        D.barrier()
        if engine is not None:
            engine.save_checkpoint(tmp, tag=DS_TAG, client_state={"step": step}, save_latest=False,
                                   exclude_frozen_parameters=True)
        elif self.rank == 0:
            params = dict(module.named_parameters())
            torch.save({"trainable": {n: params[n].detach().cpu().clone() for n in self.names},
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                       os.path.join(tmp, "state.pt"))
        torch.save(rng_state(), os.path.join(tmp, f"rng-rank{self.rank}.pt"))
        D.barrier()
        if self.rank == 0:
            info = {"step": step, "meta": self.meta, "trainable": self.names, "client": client}
            with open(os.path.join(tmp, COMPLETE), "w") as f:
                json.dump(info, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.isdir(final):  # a re-run of the same step
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            done = sorted(d for d in glob.glob(os.path.join(self.root, "step-*")) if is_complete(d))
            for old in done[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        D.barrier()
        return final

    def load(self, path: str, module, opt, sched, engine) -> tuple[int, dict]:
        info = read_info(path)
        if info.get("trainable") != self.names:
            raise _error(f"--resume {path}: its trainable tensors differ from this model's "
                         f"({len(info.get('trainable', []))} vs {len(self.names)}); was it another model or LoRA setting?")
        if engine is not None:
            engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                                   load_lr_scheduler_states=True)
        else:
            st = torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=False)
            params = dict(module.named_parameters())
            with torch.no_grad():
                for n, t in st["trainable"].items():
                    if tuple(params[n].shape) != tuple(t.shape):
                        raise _error(f"--resume {path}: {n} is {tuple(t.shape)}, the model has {tuple(params[n].shape)}")
                    params[n].copy_(t)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
        rng = os.path.join(path, f"rng-rank{self.rank}.pt")
        if os.path.isfile(rng):
            set_rng_state(torch.load(rng, weights_only=False))
        return int(info["step"]), info.get("client", {})
