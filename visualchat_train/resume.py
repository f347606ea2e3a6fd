"""Resumable training state, written atomically: everything goes to ``checkpoints/.tmp-step-N`` (all
ranks), then rank 0 writes ``complete.json`` and renames the folder to ``checkpoints/step-N``. A kill
at any moment leaves the previous complete checkpoint untouched; ``--resume auto`` takes the newest
folder that has ``complete.json``.

State: the trainable weights, optimiser and scheduler (the DeepSpeed engine's own checkpoint with
``exclude_frozen_parameters``, or ``state.safetensors`` for the plain engine), the step (which fixes
the data order, see ``visualchat_train.batches.Batcher``), per-rank RNG states (``rng-rank{r}.safetensors``) and the
run's bookkeeping (best loss, tokens; ``complete.json``).

Nothing is unpickled, so a run directory from someone else cannot run code:

- our own files are safetensors whose tensors hold every tensor (the RNG states as uint8 tensors)
  and whose metadata holds the rest as JSON (:func:`pack` / :func:`unpack`: dicts with any keys,
  tuples, numbers, strings; anything else is refused when saving);
- the DeepSpeed engine's own ``.pt`` files are read with ``torch.load(weights_only=True)`` (torch's
  restricted unpickler), allowing only DeepSpeed's plain data classes that those files hold
  (:data:`DEEPSPEED_SAFE_GLOBALS`); any other object in them stops the resume with a message;
- a checkpoint of the earlier pickle format (``state.pt``, ``rng-rank{r}.pt``) is read the same
  restricted way (tensors, numbers, and numpy's arrays for the RNG state), or refused.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import dist as D
from .errors import TrainError

COMPLETE = "complete.json"
DS_TAG = "ds"
STATE_FILE = "state.safetensors"
RNG_FILE = "rng-rank{rank}.safetensors"
LEGACY_STATE_FILE = "state.pt"
LEGACY_RNG_FILE = "rng-rank{rank}.pt"
FORMAT = "visualchat-resume-1"
#: DeepSpeed's own classes found in its ZeRO 0-3 checkpoints (plain data: no code runs to rebuild them)
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")
_STEP = re.compile(r"^step-(\d+)$")


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
        raise TrainError(f"--resume {spec!r}: no such checkpoint directory")
    if not is_complete(path):
        raise TrainError(f"--resume {spec!r} is not a complete training checkpoint (no {COMPLETE}); "
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
        raise TrainError(f"--resume {path} does not match this run ({'; '.join(diffs)}); "
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


# -- pickle-free state files: tensors in safetensors, the rest as JSON in its metadata ------------------
def pack(obj, tensors: dict, where: str = "state"):
    """A JSON-able tree for ``obj``; its tensors (and numpy arrays, as uint8 bytes) go to ``tensors``."""
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        key = f"t{len(tensors)}"
        arr = np.ascontiguousarray(obj)
        tensors[key] = torch.frombuffer(bytearray(arr.tobytes()), dtype=torch.uint8) if arr.nbytes else \
            torch.zeros(0, dtype=torch.uint8)
        return {"__ndarray__": key, "dtype": arr.dtype.str, "shape": list(arr.shape)}
    if isinstance(obj, dict):
        return {"__dict__": [[pack(k, tensors, where), pack(v, tensors, f"{where}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [pack(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: a {type(obj).__name__} cannot be stored in a resumable checkpoint (tensors, "
                    "numpy arrays, dicts, lists, tuples, numbers, strings and None can)")


def unpack(tree, tensors, where: str = "state"):
    """The inverse of :func:`pack`; ``tensors`` maps names to tensors (a safetensors file's)."""
    if isinstance(tree, list):
        return [unpack(v, tensors, where) for v in tree]
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        if set(tree) == {"__ndarray__", "dtype", "shape"}:
            raw = tensors[tree["__ndarray__"]].numpy().tobytes()
            return np.frombuffer(raw, dtype=np.dtype(tree["dtype"])).reshape(tree["shape"]).copy()
        if set(tree) == {"__dict__"}:
            return {unpack(k, tensors, where): unpack(v, tensors, where) for k, v in tree["__dict__"]}
        if set(tree) == {"__tuple__"}:
            return tuple(unpack(v, tensors, where) for v in tree["__tuple__"])
        raise TrainError(f"{where}: unknown entry {sorted(tree)[:4]} in the saved state")
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TrainError(f"{where}: unexpected {type(tree).__name__} in the saved state")


def save_state(obj, path: str) -> None:
    """Write ``obj`` (see :func:`pack`) to one safetensors file: tensors + JSON metadata."""
    tensors: dict = {}
    tree = pack(obj, tensors)
    save_file(tensors, path, metadata={"format": FORMAT, "state": json.dumps(tree)})


def load_state(path: str):
    """Read a file written by :func:`save_state` (no pickle anywhere); TrainError names the file."""
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "state" not in meta:
                raise TrainError(f"{path} is not a {FORMAT} state file (its format is {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return unpack(json.loads(meta["state"]), tensors, os.path.basename(path))
    except TrainError:
        raise
    except Exception as e:  # a truncated or corrupt file
        raise TrainError(f"{path} could not be read as a resumable state file: {e}") from None


@contextlib.contextmanager
def weights_only_loads(*extra_allowed):
    """Within the block every ``torch.load`` (DeepSpeed's included) uses ``weights_only=True``: torch's
    restricted unpickler, which builds tensors, containers and the classes allowed here, never runs code."""
    allowed = list(extra_allowed)
    for name in DEEPSPEED_SAFE_GLOBALS:
        mod, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(__import__(mod, fromlist=[attr]), attr))
        except Exception:  # not in this DeepSpeed version: nothing to allow
            pass
    real = torch.load

    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real(f, *args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _numpy_globals() -> list:
    """What numpy arrays pickle to (the legacy RNG files hold numpy's MT19937 key)."""
    out = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            out.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
        except Exception:
            pass
    return out


def _restricted_load(path: str, what: str):
    """A legacy ``.pt`` file through the weights-only unpickler, or TrainError naming it."""
    try:
        with weights_only_loads(*_numpy_globals()):
            return torch.load(path, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainError(f"--resume: {path} ({what}, an older checkpoint format) holds something other than "
                     f"tensors and plain data, so it is not loaded: unpickling it could run code ({first[:300]}). "
                     "Resume only run directories you made with this version, or start afresh with "
                     "--resume none / another --output_dir") from None


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
            save_state({"trainable": {n: params[n].detach().cpu().clone() for n in self.names},
                        "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
                       os.path.join(tmp, STATE_FILE))
        save_state(rng_state(), os.path.join(tmp, RNG_FILE.format(rank=self.rank)))
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
            raise TrainError(f"--resume {path}: its trainable tensors differ from this model's "
                         f"({len(info.get('trainable', []))} vs {len(self.names)}); was it another model or LoRA setting?")
        if engine is not None:
            try:
                with weights_only_loads():  # DeepSpeed's files are pickles: only tensors and plain data pass
                    engine.load_checkpoint(path, tag=DS_TAG, load_module_strict=False, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
            except pickle.UnpicklingError as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else "unpickling failed"
                raise TrainError(f"--resume {path}: a DeepSpeed checkpoint file under {DS_TAG}/ holds something other "
                             f"than tensors and plain data, so it is not loaded: unpickling it could run code "
                             f"({first[:300]}). Resume only run directories you made, or start afresh with "
                             "--resume none / another --output_dir") from None
        else:
            new, old = os.path.join(path, STATE_FILE), os.path.join(path, LEGACY_STATE_FILE)
            if os.path.isfile(new):
                try:
                    st = load_state(new)
                except TrainError as e:
                    raise TrainError(f"--resume {path}: {e}") from None
            elif os.path.isfile(old):
                st = _restricted_load(old, "the plain engine's state")
            else:
                raise TrainError(f"--resume {path}: no {STATE_FILE} (the plain engine's weights and optimizer state); "
                             "was it written by the DeepSpeed engine? Use the same --engine")
            if not isinstance(st, dict) or not {"trainable", "optimizer", "scheduler"} <= set(st):
                raise TrainError(f"--resume {path}: its state lacks trainable/optimizer/scheduler entries")
            params = dict(module.named_parameters())
            with torch.no_grad():
                for n, t in st["trainable"].items():
                    if n not in params or not isinstance(t, torch.Tensor):
                        raise TrainError(f"--resume {path}: its state holds {n!r}, which is not a trainable tensor "
                                     "of this model")
                    if tuple(params[n].shape) != tuple(t.shape):
                        raise TrainError(f"--resume {path}: {n} is {tuple(t.shape)}, the model has {tuple(params[n].shape)}")
                    params[n].copy_(t)
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["scheduler"])
        rng = os.path.join(path, RNG_FILE.format(rank=self.rank))
        old = os.path.join(path, LEGACY_RNG_FILE.format(rank=self.rank))
        if os.path.isfile(rng):
            try:
                set_rng_state(load_state(rng))
            except (TrainError, KeyError, TypeError, ValueError) as e:
                raise TrainError(f"--resume {path}: the RNG state {rng} is not usable: {e}") from None
        elif os.path.isfile(old):
            set_rng_state(_restricted_load(old, "an RNG state"))
        return int(info["step"]), info.get("client", {})
