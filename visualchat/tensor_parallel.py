"""DeepSpeed-Inference and tensor parallelism for serving: wrapping the frozen LM (AutoTP, kernel
injection off), joining the launcher's process group, and the :class:`Lockstep` protocol that keeps
the ranks' forwards in step. :meth:`visualchat.server.Server.load` calls this when it loads the models.

Ranks and lockstep
    Started by the DeepSpeed launcher (or torchrun) with N ranks, every rank loads the same models
    and DeepSpeed-Inference shards the frozen LM over them (AutoTP, ``tp_size=N``, kernel injection
    off because it would replace our MMCA attention). Rank 0 serves the UI. Every forward that a
    request causes (the prefill, then one per generated token) is broadcast before rank 0 runs it:
    which model, the input tensors, and which KV cache at which length. The other ranks
    (:meth:`Lockstep.follow`) run the same forward on their own shard of that cache, so the
    all-reduces inside the sharded layers meet. Stop, Undo and Regenerate need nothing extra: they
    only change which cache prefix the next forward continues from, and that travels with it.

The shared-memory all-reduce crash (DeepSpeed 0.19 on CPU)
    On CPU, DeepSpeed's ``TorchBackend`` JIT-builds its shared-memory all-reduce op
    (``deepspeed_shm_comm``) and registers ``torch.ops.deepspeed.inference_all_reduce_``. AutoTP's
    ``LinearAllreduce`` reduces through ``deepspeed.comm.inference_all_reduce``, which takes that op
    whenever it is registered and the CPU has AVX2/AVX-512. But the op's ``initialize`` only creates
    the shared-memory workspace when the environment variable ``LOCAL_SIZE`` equals the world size;
    ``LOCAL_SIZE`` is set by DeepSpeed's own launcher, not by torchrun (which sets
    ``LOCAL_WORLD_SIZE``). Without it the workspace pointers stay NULL and the first all-reduce
    dereferences them (``symmetric_naive_all_reduce``): SIGSEGV on every rank. We therefore (1) do
    not build the op and (2) route ``deepspeed.comm.inference_all_reduce`` through
    ``torch.distributed.all_reduce`` on the process group (gloo on CPU), before the first forward
    (``--tp-allreduce gloo``, the default). ``--tp-allreduce shm`` keeps DeepSpeed's faster kernel
    and makes it safe by setting ``LOCAL_SIZE`` from torchrun's ``LOCAL_WORLD_SIZE``.
"""
from __future__ import annotations

import atexit
import collections
import datetime
import inspect
import itertools
import logging
import os
import threading
import weakref
from typing import Any, Sequence

import torch

log = logging.getLogger("visualchat.tensor_parallel")


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (1 rank without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return rank, world, local



# ---------------------------------------------------------------------------------------------------
# DeepSpeed


def _disable_shm_allreduce_build() -> None:
    """Keep DeepSpeed from JIT-building (and registering) its shared-memory all-reduce op: we reduce
    through the process group, and the build alone takes minutes on a fresh machine. Shared with
    training (visualchat.deepspeed_ops); a build that does happen refuses a stale lock."""
    from .deepspeed_ops import disable_shm_comm_build, guard_extension_locks

    disable_shm_comm_build()
    guard_extension_locks()


def route_inference_all_reduce_through_process_group() -> None:
    """Make AutoTP's ``deepspeed.comm.inference_all_reduce`` a plain ``torch.distributed.all_reduce``
    (gloo on CPU, NCCL on GPU) instead of DeepSpeed's shared-memory kernel. Idempotent."""
    import deepspeed.comm as dscomm
    import torch.distributed as dist

    if getattr(dscomm.inference_all_reduce, "_visualchat", False):
        return

    def inference_all_reduce(tensor, op=None, group=None, async_op=False, **_):
        if dist.get_world_size(group=group) > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
        return tensor

    inference_all_reduce._visualchat = True
    dscomm.inference_all_reduce = inference_all_reduce  # layers.py calls it as deepspeed.comm.inference_all_reduce


def init_distributed(tp_allreduce: str = "gloo", device_type: str = "cpu") -> None:
    """Join the launcher's process group through DeepSpeed (gloo on CPU, NCCL on GPU) and set up how
    AutoTP all-reduces (see the module docstring)."""
    import deepspeed
    import torch.distributed as dist

    if tp_allreduce not in ("gloo", "shm"):
        raise ValueError(f"tp_allreduce must be gloo or shm, got {tp_allreduce!r}")
    if tp_allreduce == "gloo":
        _disable_shm_allreduce_build()
    elif device_type == "cpu" and "LOCAL_SIZE" not in os.environ:
        # torchrun sets LOCAL_WORLD_SIZE; without LOCAL_SIZE the shm op never creates its workspace
        os.environ["LOCAL_SIZE"] = os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))
    if tp_allreduce == "shm":  # the op is built below: a stale lock of an interrupted build is refused, not waited on
        from .deepspeed_ops import guard_extension_locks

        guard_extension_locks()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo" if device_type == "cpu" else "nccl",
                                   timeout=datetime.timedelta(minutes=30))
    if tp_allreduce == "gloo":
        route_inference_all_reduce_through_process_group()
    elif device_type == "cpu" and os.environ.get("LOCAL_SIZE") != str(dist.get_world_size()):
        raise RuntimeError("--tp-allreduce shm needs all ranks on one machine (LOCAL_SIZE == WORLD_SIZE); "
                           "use --tp-allreduce gloo")


def wrap_deepspeed(lm: torch.nn.Module, mode: str, world: int, dtype: torch.dtype,
                   quantization: str | None = None) -> str:
    """Wrap the frozen LM with DeepSpeed-Inference (AutoTP over ``world`` ranks, kernel injection
    off). Returns a one-line description of the backend. With one rank, any failure (DeepSpeed not
    installed, an unsupported model) is logged and the LM is served with plain PyTorch."""
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"deepspeed must be auto, on or off, got {mode!r}")
    if mode == "off":
        if world > 1:
            raise RuntimeError("several ranks need DeepSpeed AutoTP; do not pass --deepspeed off with a launcher")
        log.info("DeepSpeed-Inference off (--deepspeed off): serving with plain PyTorch")
        return "PyTorch (DeepSpeed-Inference off)"
    if quantization:
        if world > 1:
            raise RuntimeError(f"{quantization} (bitsandbytes) layers cannot be sharded by AutoTP; use one rank")
        log.warning("DeepSpeed-Inference is not used with %s (bitsandbytes) layers: serving with plain PyTorch",
                    quantization)
        return f"PyTorch ({quantization} bitsandbytes; DeepSpeed-Inference not used)"
    try:
        import deepspeed
    except Exception as e:  # ImportError, or a broken install raising anything at import
        if world > 1:
            raise RuntimeError(f"DeepSpeed could not be imported ({e}); several ranks need it") from e
        log.warning("DeepSpeed could not be loaded (%s: %s): serving with plain PyTorch", type(e).__name__, e)
        return f"PyTorch (DeepSpeed unavailable: {type(e).__name__})"
    try:
        deepspeed.init_inference(lm, tensor_parallel={"tp_size": world}, dtype=dtype,
                                 replace_with_kernel_inject=False)
    except Exception as e:
        if world > 1:
            raise
        log.warning("DeepSpeed-Inference could not wrap the LM (%s: %s): serving with plain PyTorch",
                    type(e).__name__, e)
        return f"PyTorch (DeepSpeed-Inference failed: {type(e).__name__})"
    tp = f"AutoTP over {world} ranks" if world > 1 else "1 rank"
    log.info("DeepSpeed-Inference %s wraps the LM (kernel injection off, %s)", deepspeed.__version__, tp)
    return f"DeepSpeed-Inference {deepspeed.__version__} (kernel injection off, {tp})"


# ---------------------------------------------------------------------------------------------------
# Lockstep: rank 0 announces every forward, the other ranks repeat it


class Lockstep:
    """Keeps the ranks' forwards in the same order. On rank 0, :meth:`lead` replaces each model's
    ``forward`` by one that first broadcasts its inputs on a gloo control group; :meth:`follow` (the
    other ranks) receives and runs them. KV caches are named by an id that rank 0 attaches to each
    cache object; a cache that rank 0 drops is dropped by the followers with the next message."""

    PING_S = 600.0  # rank 0 pings idle followers so their blocking receive never times out

    def __init__(self, models: Sequence[torch.nn.Module], group=None):
        import torch.distributed as dist

        self.dist = dist
        self.models = list(models)
        self.rank = dist.get_rank()
        self.group = group if group is not None else dist.new_group(backend="gloo",
                                                                   timeout=datetime.timedelta(days=7))
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        self._freed: collections.deque[int] = collections.deque()  # filled by finalizers (any thread)
        self._stopped = False
        self._ping: threading.Thread | None = None
        self.forwards = 0

    # -- transport -----------------------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        self.dist.broadcast_object_list([msg], src=0, group=self.group)

    def _recv(self) -> dict:
        box = [None]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    # -- rank 0 --------------------------------------------------------------------------------
    def lead(self, ping_s: float | None = PING_S) -> None:
        if self.rank != 0:
            raise RuntimeError("only rank 0 leads")
        for i, m in enumerate(self.models):
            orig = m.forward
            sig = inspect.signature(orig)

            def forward(*args, _i=i, _orig=orig, _sig=sig, **kwargs):
                return self._lead_forward(_i, _orig, _sig, args, kwargs)

            m.forward = forward
        atexit.register(self.stop)
        if ping_s:
            self._ping = threading.Thread(target=self._ping_loop, args=(ping_s,), daemon=True, name="lockstep-ping")
            self._ping.start()

    def _cache_id(self, cache) -> int:
        cid = getattr(cache, "_visualchat_lockstep_id", None)
        if cid is None:
            cid = next(self._ids)
            cache._visualchat_lockstep_id = cid
            weakref.finalize(cache, self._freed.append, cid)  # deque.append: safe without the lock
        return cid

    def _lead_forward(self, index: int, orig, sig, args, kwargs):
        bound = sig.bind(*args, **kwargs)
        call = dict(bound.arguments)
        cache = call.pop("past_key_values", None)
        with self.lock:
            if self._stopped:
                raise RuntimeError("the other ranks have been stopped")
            if cache is not None:
                cid, length = self._cache_id(cache), cache.get_seq_length()
            else:
                cid, length = next(self._ids), None
            freed = []
            while self._freed:
                freed.append(self._freed.popleft())
            wire = {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in call.items()}
            self._send({"op": "forward", "model": index, "cache": cid, "cache_len": length, "free": freed,
                        "args": wire})
            self.forwards += 1
            out = orig(past_key_values=cache, **call)
            new_cache = getattr(out, "cache", None)  # a LogitsOutput's KV cache
            if cache is None and hasattr(new_cache, "get_seq_length"):
                new_cache._visualchat_lockstep_id = cid  # the LM made a new cache: the followers bind theirs to cid
                weakref.finalize(new_cache, self._freed.append, cid)
            return out

    def _ping_loop(self, every: float) -> None:
        while True:
            threading.Event().wait(every)
            with self.lock:
                if self._stopped:
                    return
                self._send({"op": "ping"})

    def stop(self) -> None:
        """Tell the followers to return from :meth:`follow` (rank 0; also at exit)."""
        with self.lock:
            if self._stopped or self.rank != 0:
                return
            self._stopped = True
            try:
                self._send({"op": "stop"})
            except Exception as e:  # the group is already gone at interpreter exit
                log.debug("lockstep stop: %s", e)

    # -- ranks > 0 -----------------------------------------------------------------------------
    def follow(self) -> None:
        """Run rank 0's forwards until it stops (ranks > 0)."""
        caches: dict[int, Any] = {}
        while True:
            msg = self._recv()
            for cid in msg.get("free", ()):
                caches.pop(cid, None)
            op = msg["op"]
            if op == "stop":
                return
            if op == "ping":
                continue
            if op != "forward":
                raise RuntimeError(f"unknown lockstep op {op!r}")
            model = self.models[msg["model"]]
            dev = next(model.parameters()).device
            call = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in msg["args"].items()}
            cid, length = msg["cache"], msg["cache_len"]
            cache = None
            if length is not None:
                cache = caches.get(cid)
                if cache is None:
                    if length:
                        raise RuntimeError(f"lockstep out of sync: rank 0 continues cache {cid} at {length} tokens, "
                                           "this rank has none")
                    cache = model.new_cache()
                have = cache.get_seq_length()
                if have < length:
                    raise RuntimeError(f"lockstep out of sync: cache {cid} has {have} tokens here, {length} on rank 0")
                if have > length:
                    cache.crop(length - have)
                caches[cid] = cache
            self.forwards += 1
            with torch.no_grad():
                out = model(past_key_values=cache, **call)
            if hasattr(getattr(out, "cache", None), "get_seq_length"):
                caches[cid] = out.cache
