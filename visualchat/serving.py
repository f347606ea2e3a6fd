"""Serving: loading the models for the app, DeepSpeed-Inference, AutoTP over several ranks in
lockstep, ZeroGPU, and one conversation per browser tab. ``app.py`` is only the UI on top of this.

Ranks and lockstep
    Started by the DeepSpeed launcher (or torchrun) with N ranks, every rank loads the same models
    and DeepSpeed-Inference shards the frozen LM over them (AutoTP, ``tp_size=N``, kernel injection
    off because it would replace our MMCA attention). Rank 0 serves the UI. Every forward that a
    request causes (the prefill, then one per generated token) is broadcast before rank 0 runs it:
    which model, the input tensors, and which KV cache at which length. The other ranks
    (:meth:`Server.follow`) run the same forward on their own shard of that cache, so the
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

ZeroGPU
    ``@spaces.GPU`` runs the decorated function in a forked worker and pickles its arguments and
    results, so it cannot carry a session with a KV cache. On ZeroGPU (``SPACES_ZERO_GPU``) the chats
    keep their conversation as plain data and every answer replays it through
    :func:`stream_conversation`, the only decorated function. Off ZeroGPU ``spaces.GPU`` is not used.
"""
from __future__ import annotations

import atexit
import base64
import collections
import binascii
import contextlib
import datetime
import inspect
import itertools
import logging
import os
import shutil
import tempfile
import threading
import uuid
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .assets import DEFAULT_CA_CHECKPOINT, DEFAULT_CHECKPOINT, shipped_checkpoint
from .config import VisualChatConfig
from .generation import GenerationConfig
from .images import ImageError, open_image
from .session import (ContextWindowError, TooManyImagesError, check_context, check_image_count,
                      check_question)
from .template import Conversation, Round

log = logging.getLogger("visualchat.serving")

#: The errors that mean "the user's input is not acceptable"; the message is for the user.
INPUT_ERRORS = (ImageError, TooManyImagesError, ContextWindowError, ValueError)

DISPLAY_MAX_SIDE = 1024  # the chat shows a copy of each image at most this large (the model sees the original)


# ---------------------------------------------------------------------------------------------------
# Limits: what one request may cost


_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "kib": 1024, "mib": 1024 ** 2,
               "gib": 1024 ** 3}


def parse_size(value, what: str = "size") -> int:
    """Bytes from an int or a string like ``25mb``, ``500kb``, ``2gb`` (decimal units, as Gradio's
    ``max_file_size``) or ``1GiB``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size like 25mb or a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):]
        try:
            n = int(float(num) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(f"{what} must be a size like 25mb, 500kb, 2gb or a number of bytes, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


def _env_value(name: str, default, convert):
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    try:
        return convert(v)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={v!r}: {e}") from None


@dataclass
class Limits:
    """The server's bounds on one request's cost, checked before any decoding or model work (flags and
    environment variables of ``app.py``; the README's table lists them)."""

    max_new_tokens: int = 1024  # VISUALCHAT_MAX_NEW_TOKENS_LIMIT: a larger max_new_tokens is refused
    max_question_chars: int = 4000  # VISUALCHAT_MAX_QUESTION_CHARS (earlier answers: 4x this)
    max_image_bytes: int = 25_000_000  # VISUALCHAT_MAX_FILE_SIZE: also caps data:/base64 images before decoding
    answer_seconds: float = 120.0  # VISUALCHAT_ANSWER_SECONDS: an answer stops generating after this long
    unread_seconds: float = 15.0  # VISUALCHAT_UNREAD_SECONDS: an API answer nobody reads stops after this long
    kv_cache_budget: int = 2_000_000_000  # VISUALCHAT_KV_CACHE_BUDGET: all tabs' KV caches together, bytes
    max_request_bytes: int = 64_000_000  # VISUALCHAT_MAX_REQUEST_SIZE: an API request's body (uploads: max_file_size)

    def __post_init__(self):
        for name in ("max_new_tokens", "max_question_chars", "max_image_bytes", "kv_cache_budget", "max_request_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"limit {name} must be a positive whole number, got {v!r}")
        for name in ("answer_seconds", "unread_seconds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                raise ValueError(f"limit {name} must be a positive number of seconds, got {v!r}")

    @property
    def max_answer_chars(self) -> int:
        return 4 * self.max_question_chars

    @classmethod
    def from_env(cls) -> "Limits":
        d = cls.__dataclass_fields__
        return cls(
            max_new_tokens=_env_value("VISUALCHAT_MAX_NEW_TOKENS_LIMIT", d["max_new_tokens"].default, int),
            max_question_chars=_env_value("VISUALCHAT_MAX_QUESTION_CHARS", d["max_question_chars"].default, int),
            max_image_bytes=_env_value("VISUALCHAT_MAX_FILE_SIZE", d["max_image_bytes"].default, parse_size),
            answer_seconds=_env_value("VISUALCHAT_ANSWER_SECONDS", d["answer_seconds"].default, float),
            unread_seconds=_env_value("VISUALCHAT_UNREAD_SECONDS", d["unread_seconds"].default, float),
            kv_cache_budget=_env_value("VISUALCHAT_KV_CACHE_BUDGET", d["kv_cache_budget"].default, parse_size),
            max_request_bytes=_env_value("VISUALCHAT_MAX_REQUEST_SIZE", d["max_request_bytes"].default, parse_size))


class RequestSizeLimit:
    """ASGI middleware: refuse (413, with a message) a POST body over ``max_bytes`` before the web app
    parses it. Gradio caps file uploads (``max_file_size``, the /upload route, left alone here) but
    reads any JSON body whole into memory and keeps it while the request waits in the queue."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def _refuse(self, receive, send, size_text: str, more: bool = True) -> None:
        import json

        while more:  # read the rest without keeping it, so the client gets to read the answer
            msg = await receive()
            more = msg["type"] == "http.request" and msg.get("more_body", False)

        body = json.dumps({"detail": f"the request body is {size_text} bytes; this server accepts at most "
                                     f"{self.max_bytes:,} (--max-request-size). Send large images with "
                                     "gradio_client.handle_file(...) instead of inline base64"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path", "").rstrip("/").endswith("/upload"):
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                n = -1
            if n > self.max_bytes:
                return await self._refuse(receive, send, f"{n:,}")
            return await self.app(scope, receive, send)
        chunks, total = [], 0  # no length given (chunked): read up to the limit, then replay
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return
            chunks.append(msg.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._refuse(receive, send, f"over {self.max_bytes:,}", bool(msg.get("more_body")))
            if not msg.get("more_body"):
                break
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()
        return await self.app(scope, replay, send)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_number(value, field: str, lo: float, hi: float, lo_open: bool = False, integer: bool = False,
                 allowed: str | None = None):
    """``value`` as a finite number (an int when ``integer``) in [lo, hi] (or (lo, hi]), else a ValueError
    that names the field and what is allowed."""
    allowed = allowed or (f"{'a whole number' if integer else 'a number'} "
                          f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}")
    if not _is_number(value):
        raise ValueError(f"{field} must be {allowed}, got {'null' if value is None else type(value).__name__}")
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError(f"{field} must be {allowed}, got {value}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{field} must be {allowed}, got {value}")
        value = int(value)
    if value < lo or (lo_open and value == lo) or value > hi:
        raise ValueError(f"{field} must be {allowed}, got {value}")
    return value


def check_generation(gen: dict, limits: "Limits") -> dict:
    """Validate generation settings (types, finiteness, ranges, the server's max_new_tokens limit);
    returns them normalised. Messages name the field and what is allowed."""
    out = dict(gen)
    if "max_new_tokens" in gen:
        out["max_new_tokens"] = check_number(
            gen["max_new_tokens"], "max_new_tokens", 1, limits.max_new_tokens, integer=True,
            allowed=f"a whole number from 1 to {limits.max_new_tokens} (this server's limit)")
    if "temperature" in gen:
        out["temperature"] = float(check_number(gen["temperature"], "temperature", 0, 5,
                                                allowed="a number from 0 (greedy) to 5"))
    if "top_p" in gen:
        out["top_p"] = float(check_number(gen["top_p"], "top_p", 0, 1, lo_open=True,
                                          allowed="a number > 0 and <= 1"))
    if "repetition_penalty" in gen:
        out["repetition_penalty"] = float(check_number(gen["repetition_penalty"], "repetition_penalty", 0, 10,
                                                       lo_open=True, allowed="a number > 0 and <= 10 (1 = off)"))
    if gen.get("seed") is not None:
        out["seed"] = check_number(gen["seed"], "seed", 0, 2 ** 63 - 1, integer=True,
                                   allowed="null or a whole number from 0 to 2**63-1")
    return out


def check_text(value, field: str, limit: int, required: bool = True) -> str:
    """A question or answer: a string of valid Unicode (no lone surrogates), at most ``limit`` characters."""
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise ValueError(f"{field} must be text{'' if required else ' or null'}, got {got}")
    for i, ch in enumerate(value):
        if "\ud800" <= ch <= "\udfff":
            raise ValueError(f"{field} contains a lone surrogate (U+{ord(ch):04X}) at character {i + 1}; "
                             "send valid Unicode text")
    if len(value) > limit:
        raise ValueError(f"{field} is {len(value):,} characters long; this server accepts at most {limit:,}")
    return value


# ---------------------------------------------------------------------------------------------------
# Options


@dataclass
class ServeOptions:
    """What to load and how to run it. ``app.py`` fills this from flags and environment variables."""

    checkpoint: str | None = None  # None: the shipped default (assets/checkpoints/shapes-mmca), else untrained
    lm: str | None = None
    vision: str | None = None
    compare: bool = True
    ca_checkpoint: str | None = None  # None: assets/checkpoints/shapes-ca
    mmca_checkpoint: str | None = None  # None: assets/checkpoints/shapes-mmca
    device: str | None = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16; on one CPU rank: the LM's weight format (lowp)
    quantization: str | None = None  # 4bit | 8bit | None
    deepspeed: str = "auto"  # auto | on | off
    tp_allreduce: str = "gloo"  # gloo | shm
    trust_remote_code: bool = False
    limits: Limits | None = None  # None: Limits.from_env()


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name in (None, "", "auto"):
        return None
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}") from None


def plan_dtype(name: str | None, dev_type: str, world: int = 1, quantization: str | None = None
               ) -> tuple[torch.dtype, str | None]:
    """``--dtype`` -> (the model's dtype, the LM weight format for ``from_pretrained(lm_weights=)``).
    On one CPU rank ``--dtype`` picks the frozen LM's linear-weight format (visualchat.lowp: ``auto`` is
    the fastest one that keeps the answers, fp16 where the CPU has it) and everything else stays
    float32; on a GPU, on several ranks (AutoTP shards plain linear layers) or with bitsandbytes it is
    the dtype of the whole model, as before (auto: bfloat16 on GPU, float32 on CPU)."""
    dtype = parse_dtype(name)  # validates the name
    if dev_type == "cpu" and world == 1 and not quantization:
        from .lowp import normalize

        return torch.float32, normalize(name)
    return dtype or (torch.bfloat16 if dev_type == "cuda" else torch.float32), None


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (1 rank without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return rank, world, local


# ---------------------------------------------------------------------------------------------------
# ZeroGPU


def zero_gpu_active() -> bool:
    """True on a Hugging Face ZeroGPU Space (the ``spaces`` package importable and SPACES_ZERO_GPU set),
    or when VISUALCHAT_STATELESS=1 forces the same stateless replay path."""
    if os.environ.get("VISUALCHAT_STATELESS", "").lower() in ("1", "true", "yes"):
        return True
    if os.environ.get("SPACES_ZERO_GPU", "").lower() not in ("1", "t", "true"):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_decorator(duration: int | None = None) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` when the ``spaces`` package is importable, else the identity."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    duration = duration or int(os.environ.get("VISUALCHAT_GPU_DURATION", "120"))
    return spaces.GPU(duration=duration)


_REGISTRY: dict[str, Any] = {}  # model key -> VisualChat, read by stream_conversation (also in a forked worker)


def stream_conversation(key: str, history: list[dict], question: str, images: Sequence, gen: dict) -> Iterator[str]:
    """Answer ``question`` (with ``images``) after ``history`` (dicts with question, images, answer) on
    the registered model ``key``: a fresh session, nothing kept. Only plain data in and text out, so
    ``spaces.GPU`` can run it in its forked worker."""
    vc = _REGISTRY[key]
    session = vc.new_session()
    for r in history:
        session.add_round(r["question"], r.get("images") or (), r.get("answer") or "")
    yield from session.stream(question, images, **gen)


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
            if cache is None and isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "get_seq_length"):
                out[1]._visualchat_lockstep_id = cid  # the LM made a new cache: the followers bind theirs to cid
                weakref.finalize(out[1], self._freed.append, cid)
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
            if isinstance(out, tuple) and len(out) == 2 and hasattr(out[1], "get_seq_length"):
                caches[cid] = out[1]


# ---------------------------------------------------------------------------------------------------
# The server: models, backend, ranks


@dataclass
class CompareInfo:
    """The CA vs MMCA pair, or what is missing for it."""

    ca: Any = None
    mmca: Any = None
    ca_path: str | None = None
    mmca_path: str | None = None
    missing: list[str] = field(default_factory=list)
    note: str = ""

    @property
    def ready(self) -> bool:
        return self.ca is not None and self.mmca is not None


class Server:
    """The loaded models and how they run. Build with :meth:`load` (from options) or
    :meth:`from_models` (already built VisualChats, e.g. in tests)."""

    def __init__(self, chat, compare: CompareInfo | None = None, backend: str = "PyTorch",
                 stateless: bool | None = None, rank: int = 0, world_size: int = 1, lockstep: Lockstep | None = None,
                 limits: Limits | None = None):
        self.chat = chat
        self.limits = limits or Limits.from_env()
        self._chats: weakref.WeakSet = weakref.WeakSet()  # the tabs' ChatSessions (for the KV-cache budget)
        self._chats_lock = threading.Lock()
        self.kv_drops = 0  # how many times a tab's KV cache was dropped for the budget
        self.compare = compare or CompareInfo(note="The Compare tab is off.")
        self.backend = backend
        self.stateless = zero_gpu_active() if stateless is None else stateless
        self.rank, self.world_size, self.lockstep = rank, world_size, lockstep
        self._prefix = uuid.uuid4().hex[:8]
        self.models = {"chat": chat}
        if self.compare.ready:
            self.models.update(ca=self.compare.ca, mmca=self.compare.mmca)
        for name, vc in self.models.items():
            _REGISTRY[self.key(name)] = vc
        self._remote = gpu_decorator()(stream_conversation) if self.stateless else stream_conversation
        self.tmpdir = tempfile.mkdtemp(prefix="visualchat-ui-")  # display copies of images (Gradio may serve tmp)
        atexit.register(shutil.rmtree, self.tmpdir, True)

    def key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    @classmethod
    def from_models(cls, chat, compare: tuple | None = None, **kw) -> "Server":
        info = None
        if compare is not None:
            ca, mmca = compare
            info = CompareInfo(ca=ca, mmca=mmca, ca_path=getattr(ca, "path", None), mmca_path=getattr(mmca, "path", None))
        elif "compare_missing" in kw:
            missing = kw.pop("compare_missing")
            info = CompareInfo(missing=list(missing), note=_missing_note(missing))
        return cls(chat, info, **kw)

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, opts: ServeOptions) -> "Server":
        from .model import VisualChat

        rank, world, local = dist_env()
        device = opts.device
        if device is None:
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and world > 1:
            device = f"cuda:{local}"
        dev_type = torch.device(device).type
        if world > 1:
            if opts.deepspeed == "off":
                raise RuntimeError("several ranks need DeepSpeed AutoTP; do not pass --deepspeed off with a launcher")
            init_distributed(opts.tp_allreduce, dev_type)
            if dev_type == "cuda":
                torch.cuda.set_device(torch.device(device))
        dtype, lm_weights = plan_dtype(opts.dtype, dev_type, world, opts.quantization)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            chat = VisualChat.from_pretrained(opts.checkpoint, lm=opts.lm, vision=opts.vision, device=device,
                                              dtype=dtype, quantization=opts.quantization,
                                              trust_remote_code=opts.trust_remote_code, lm_weights=lm_weights)
        chat.untrained = any("UNTRAINED" in str(w.message) for w in caught)
        for w in caught:
            log.warning("%s", w.message)
        compare = cls._load_compare(opts, chat, device, dtype, lm_weights) if opts.compare else CompareInfo(
            note="The Compare tab is off (--no-compare).")
        stateless = zero_gpu_active()
        if stateless and opts.deepspeed == "auto":
            # ZeroGPU forks a worker per call and attaches the GPU only there; DeepSpeed's engine would
            # try to place the LM on a device in the main process
            log.warning("ZeroGPU: DeepSpeed-Inference is not used (--deepspeed on forces it); serving with PyTorch")
            backend = "PyTorch (ZeroGPU)"
        else:
            backend = wrap_deepspeed(chat.model.lm, opts.deepspeed, world, dtype, opts.quantization)
        for vc in (compare.ca, compare.mmca):
            if vc is not None and vc.model.lm is not chat.model.lm:
                wrap_deepspeed(vc.model.lm, opts.deepspeed, world, dtype, opts.quantization)
        backend += f" · {device} {str(dtype).replace('torch.', '')}"
        if lm_weights is not None:  # the LM's weight format on CPU (visualchat.lowp), and why if it fell back
            backend += f", LM weights {chat.lm_weights}" + (f" ({chat.lm_weights_note})" if chat.lm_weights_note else "")
        lockstep = None
        if world > 1:
            models = []
            for vc in (chat, compare.ca, compare.mmca):
                if vc is not None and all(vc.model is not m for m in models):
                    models.append(vc.model)
            lockstep = Lockstep(models)
            if rank == 0:
                lockstep.lead()
        return cls(chat, compare, backend=backend, stateless=stateless, rank=rank, world_size=world,
                   lockstep=lockstep, limits=opts.limits)

    @staticmethod
    def _load_compare(opts: ServeOptions, chat, device, dtype, lm_weights: str | None = None) -> CompareInfo:
        from .model import VisualChat

        paths = {"ca": opts.ca_checkpoint or shipped_checkpoint(DEFAULT_CA_CHECKPOINT),
                 "mmca": opts.mmca_checkpoint or shipped_checkpoint(DEFAULT_CHECKPOINT)}
        defaults = {"ca": DEFAULT_CA_CHECKPOINT, "mmca": DEFAULT_CHECKPOINT}
        missing = [f"assets/checkpoints/{defaults[k]}" for k, p in paths.items() if p is None]
        if missing:
            return CompareInfo(missing=missing, note=_missing_note(missing))
        loaded = {}
        for k, path in paths.items():
            if getattr(chat, "path", None) and os.path.realpath(path) == os.path.realpath(chat.path):
                loaded[k] = chat  # the chat model is this checkpoint already
                continue
            cfg = VisualChatConfig.load(path)
            same = _same_base(cfg, chat.config, opts)
            if not same:
                log.warning("%s was trained on another base (%s + %s) than the chat model: it loads its own LM "
                            "and encoder (more memory)", path, cfg.lm, cfg.vision)
            loaded[k] = VisualChat.from_pretrained(path, lm=opts.lm, vision=opts.vision, device=device, dtype=dtype,
                                                   quantization=opts.quantization, share_with=chat if same else None,
                                                   trust_remote_code=opts.trust_remote_code, lm_weights=lm_weights)
        return CompareInfo(ca=loaded["ca"], mmca=loaded["mmca"], ca_path=paths["ca"], mmca_path=paths["mmca"])

    # -- ranks > 0 -----------------------------------------------------------------------------
    def follow(self) -> None:
        if self.lockstep is None or self.rank == 0:
            raise RuntimeError("follow() is for ranks > 0 of a multi-rank start")
        log.info("rank %d follows rank 0's forwards", self.rank)
        self.lockstep.follow()

    # -- the tabs' KV caches --------------------------------------------------------------------
    def register_chat(self, chat: "ChatSession") -> None:
        with self._chats_lock:
            self._chats.add(chat)

    def kv_cache_bytes(self) -> int:
        """Bytes held by every tab's KV cache now."""
        with self._chats_lock:
            chats = list(self._chats)
        return sum(c.cache_bytes() for c in chats)

    def enforce_kv_budget(self, keep: "ChatSession | None" = None) -> int:
        """Drop the KV caches of the least recently used tabs until all of them together fit
        ``limits.kv_cache_budget``; a dropped tab rebuilds its cache on its next round (from its tokens
        and stored image features). ``keep`` (the tab that just answered) and tabs generating now are
        never dropped. Returns the bytes freed."""
        with self._chats_lock:
            chats = list(self._chats)
        sizes = {id(c): c.cache_bytes() for c in chats}
        total = sum(sizes.values())
        freed = 0
        for c in sorted(chats, key=lambda c: c.last_used):
            if total <= self.limits.kv_cache_budget:
                break
            if c is keep or not sizes[id(c)]:
                continue
            if c.drop_cache(blocking=False):
                total -= sizes[id(c)]
                freed += sizes[id(c)]
                self.kv_drops += 1
                log.info("KV-cache budget (%s bytes): dropped an idle tab's cache of %s bytes", 
                         f"{self.limits.kv_cache_budget:,}", f"{sizes[id(c)]:,}")
        return freed

    # -- stateless generation ------------------------------------------------------------------
    def stream(self, name: str, history: list[dict], question: str, images: Sequence, gen: dict) -> Iterator[str]:
        """Validate in this process (clear errors, no GPU time spent on bad input), then stream the
        answer from a fresh session (on ZeroGPU in its worker)."""
        vc = self.models[name]
        conv = Conversation(system=vc.config.system)
        for r in history:
            conv.rounds.append(Round(check_question(r.get("question")), [open_image(im) for im in r.get("images") or ()],
                                     (r.get("answer") or "").strip()))
        q = check_question(question)
        GenerationConfig(**gen)
        conv.rounds.append(Round(q, [open_image(im) for im in images]))
        check_fits(vc, conv)
        hist = [{"question": r.question, "images": r.images, "answer": r.answer} for r in conv.rounds[:-1]]
        return self._remote(self.key(name), hist, q, conv.rounds[-1].images, dict(gen))


def _missing_note(missing: Sequence[str]) -> str:
    what = " and ".join(f"`{m}`" for m in missing)
    return (f"The CA vs MMCA comparison needs two trained checkpoints, and {what} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Train them with the shapes recipe (the "
            "default-checkpoint issue ships them in `assets/checkpoints/`), or point the app at your own with "
            "`--ca-checkpoint DIR --mmca-checkpoint DIR` (or `VISUALCHAT_CA_CHECKPOINT`/`VISUALCHAT_MMCA_CHECKPOINT`).")


def _same_base(cfg: VisualChatConfig, chat_cfg: VisualChatConfig, opts: ServeOptions) -> bool:
    norm = {"default": "efficientnet-lite0"}
    lm_a, lm_b = opts.lm or cfg.lm, opts.lm or chat_cfg.lm
    v_a, v_b = opts.vision or cfg.vision, opts.vision or chat_cfg.vision
    return lm_a == lm_b and norm.get(v_a, v_a) == norm.get(v_b, v_b)


def check_fits(vc, conv: Conversation) -> None:
    """Raise TooManyImagesError / ContextWindowError as a session would, without running the model."""
    check_image_count(len(conv.images), vc.config.max_images)
    check_context(vc.template.render(conv), vc.context_window)


# ---------------------------------------------------------------------------------------------------
# API input


#: The media types a ``data:`` URL may declare (the formats visualchat.images opens).
DATA_URL_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/gif", "image/webp", "image/bmp")


def _b64_payload(text: str, field: str, limits: Limits) -> bytes:
    """Decode base64 image data, refusing it by its length before decoding when it is too large."""
    size = len(text) * 3 // 4
    if size > limits.max_image_bytes:
        raise ImageError(f"{field} holds about {size:,} bytes of image data; this server accepts images of up to "
                         f"{limits.max_image_bytes:,} bytes (--max-file-size)")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise ImageError(f"{field} is not valid base64: {e}") from None


def api_image(item, upload_dir: str | None = None, limits: Limits | None = None, field: str = "image"):
    """One image of a ``/generate`` request: a Gradio file (a dict with a ``path`` inside Gradio's upload
    folder, which is what ``gradio_client.handle_file`` turns into), a ``data:image/...;base64,`` URL or
    a ``base64:`` string. Server paths outside the upload folder are refused; inline data larger than
    ``limits.max_image_bytes`` is refused by its length, before it is decoded."""
    limits = limits or Limits.from_env()
    if isinstance(item, dict) and "path" in item:
        from gradio.utils import get_upload_folder, is_in_or_equal

        if not isinstance(item["path"], str) or not item["path"]:
            raise ImageError(f"{field}: a file's path must be text, got {type(item['path']).__name__}")
        path = item["path"]
        name = item.get("orig_name") if isinstance(item.get("orig_name"), str) else os.path.basename(path)
        if not is_in_or_equal(path, upload_dir or get_upload_folder()):
            raise ImageError(f"{field} ({name!r}) was not uploaded through this server; send it with "
                             "gradio_client.handle_file(...) or as a data:image/...;base64, URL")
        try:
            size = os.path.getsize(path)
        except OSError:
            raise ImageError(f"{field} ({name!r}) is not on this server (upload it again)") from None
        if size > limits.max_image_bytes:
            raise ImageError(f"{field} ({name!r}) is {size:,} bytes; this server accepts images of up to "
                             f"{limits.max_image_bytes:,} bytes (--max-file-size)")
        return path
    if isinstance(item, str) and item.startswith("data:"):
        head, sep, payload = item.partition(",")
        parts = head[len("data:"):].split(";")
        mime = parts[0].strip().lower()
        if not sep or "base64" not in [p.strip().lower() for p in parts[1:]]:
            raise ImageError(f"{field}: a data URL must be data:<image type>;base64,<data>")
        if mime not in DATA_URL_TYPES:
            raise ImageError(f"{field}: a data URL's media type must be one of image/png, image/jpeg, image/gif, "
                             f"image/webp or image/bmp, got {mime or 'none'!r}")
        return _b64_payload(payload, field, limits)
    if isinstance(item, str) and item.startswith("base64:"):
        return _b64_payload(item[len("base64:"):], field, limits)
    got = "null" if item is None else ("a dict without 'path'" if isinstance(item, dict) else type(item).__name__)
    raise ImageError(f"{field} must be a file (gradio_client.handle_file(path)), a data:image/...;base64, URL "
                     f"or a 'base64:...' string, got {got}")


def parse_api_conversation(conversation, limits: Limits | None = None,
                           upload_dir: str | None = None) -> tuple[list[dict], str, list]:
    """``[{"question": ..., "images": [...], "answer": ...}, ...]`` -> (history, question, images).
    Every round but the last may carry its answer; the last round is the one to answer. Every field is
    checked for its type and size before anything is decoded; messages name the round and the field."""
    limits = limits or Limits.from_env()
    if isinstance(conversation, dict) and "rounds" in conversation:
        conversation = conversation["rounds"]
    if not isinstance(conversation, list) or not conversation:
        raise ValueError("conversation must be a non-empty list of rounds: "
                         '[{"question": "...", "images": [...]}, ...]')
    rounds = []
    for i, r in enumerate(conversation, 1):
        if isinstance(r, str):
            r = {"question": r}
        if not isinstance(r, dict):
            raise ValueError(f"round {i} must be an object with a question (and optionally images, answer), "
                             f"got {type(r).__name__}")
        unknown = set(r) - {"question", "images", "answer"}
        if unknown:
            raise ValueError(f"round {i} has unknown keys {sorted(map(str, unknown))}; use question, images, answer")
        q = check_text(r.get("question"), f"the question of round {i}", limits.max_question_chars)
        if not q.strip():
            raise ValueError(f"the question of round {i} is empty")
        answer = check_text(r.get("answer"), f"the answer of round {i}", limits.max_answer_chars, required=False)
        images = r.get("images")
        if images is None:
            images = []
        elif not isinstance(images, list):
            images = [images]
        rounds.append({"question": q, "images": images, "answer": answer})
    if rounds[-1]["answer"].strip():
        raise ValueError("the last round already has an answer; append the round to answer")
    n = 0
    for i, r in enumerate(rounds, 1):  # decoded only once every round's text has passed
        opened = []
        for x in r["images"]:
            n += 1
            opened.append(api_image(x, upload_dir, limits, field=f"image {n} (round {i})"))
        r["images"] = opened
    last = rounds.pop()
    return rounds, last["question"], last["images"]


def validate_api_request(server: "Server", conversation, max_new_tokens=128, temperature=0.0, top_p=1.0,
                         repetition_penalty=1.0, seed=None, model="chat") -> tuple[str, list[dict], str, list, dict]:
    """Everything ``/generate`` receives, checked up front (types, finiteness, ranges, sizes) with a message
    naming the field: (model, history, question, images, generation settings)."""
    if not isinstance(model, str) or model not in server.models:
        got = repr(model) if isinstance(model, str) else ("null" if model is None else type(model).__name__)
        raise ValueError(f"model must be one of {sorted(server.models)}, got {got}"
                         + ("" if server.compare.ready else f" ({server.compare.note})"))
    gen = check_generation(dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                repetition_penalty=repetition_penalty, seed=seed), server.limits)
    history, question, images = parse_api_conversation(conversation, server.limits)
    return model, history, question, images, gen


# ---------------------------------------------------------------------------------------------------
# Bounding a running answer: a wall-clock limit, and answers nobody reads


class AbandonedError(RuntimeError):
    """Nobody has read an answer's output for too long (the client went away without cancelling)."""


def bounded(stream: Iterator[str], seconds: float, unread: Callable[[], bool] | None = None,
            on_deadline: Callable[[], None] | None = None) -> Iterator[str]:
    """Yield ``stream``'s pieces until it ends or ``seconds`` have passed since the first one was asked
    for (then ``on_deadline()`` and stop: the answer so far stands, as with max_new_tokens), checked
    between tokens. ``unread()`` true between tokens raises :class:`AbandonedError`. Closes ``stream``."""
    import time

    deadline = time.monotonic() + seconds
    try:
        for piece in stream:
            yield piece
            if unread is not None and unread():
                raise AbandonedError("nobody read this answer's output, so it was stopped")
            if time.monotonic() > deadline:
                log.warning("an answer reached the time limit of %g s per answer and was stopped", seconds)
                if on_deadline is not None:
                    on_deadline()
                return
    finally:
        close = getattr(stream, "close", None)
        if close:
            close()


def unread_probe(request, seconds: float) -> Callable[[], bool] | None:
    """For a queued Gradio request, a function that is true once the request's session has left its
    output unread for ``seconds`` (a POST to /gradio_api/call/generate whose result is never fetched: its
    messages pile up in the session's queue). None when the request carries no session to watch.

    Gradio itself stops a generator whose reader disconnects (it marks the event dead), but an event
    that was never read stays alive and would hold a worker to the end; this closes that gap. A live
    reader (gradio_client, the browser, a curl GET) drains the queue within milliseconds of each piece."""
    import time

    try:
        session = request.session_hash
        queue = request.request.app.get_blocks()._queue
    except Exception:  # not a queued Gradio request (a test calling the handler directly)
        return None
    if not session:
        return None
    state = {"drained": time.monotonic()}

    def unread() -> bool:
        q = queue.pending_messages_per_session.get(session)
        now = time.monotonic()
        if q is None or q.qsize() <= 1:  # read (or nothing to read): the reader is keeping up
            state["drained"] = now
            return False
        return now - state["drained"] > seconds
    return unread


def forget_request_inputs(request, api_name: str) -> int:
    """Drop the copy of a finished request's inputs that Gradio keeps in its per-session state (the
    component values of the session's config, kept for up to 10,000 sessions): every POST to
    /gradio_api/call/<api_name> is a session of its own, so without this each request's conversation
    (a 50 MB data URL included) stayed in memory after its answer. Returns how many values were dropped."""
    try:
        blocks = request.request.app.get_blocks()
        state = blocks.state_holder.session_data.get(request.session_hash)
        fns = [f for f in blocks.fns.values() if getattr(f, "api_name", None) == api_name]
    except Exception:  # not a queued Gradio request (a test calling the handler directly)
        return 0
    n = 0
    for fn in fns if state is not None else ():
        for block in fn.inputs:
            cfg = state.config_values.get(block._id)
            if isinstance(cfg, dict) and isinstance(cfg.get("props"), dict) and cfg["props"].get("value") is not None:
                cfg["props"]["value"] = None
                n += 1
    return n


def cache_bytes(cache) -> int:
    """Memory held by a transformers KV cache (each storage counted once)."""
    if cache is None:
        return 0
    seen, total = set(), 0
    for layer in getattr(cache, "layers", None) or ():
        for t in vars(layer).values():
            if torch.is_tensor(t) and t.numel():
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


# ---------------------------------------------------------------------------------------------------
# One conversation of one browser tab


@dataclass
class ChatRound:
    """What the UI shows of a round: the question, the display copies of its images, the answer."""

    question: str
    paths: list[str]
    answer: str | None
    first_image: int  # the conversation-wide number of its first image (1-based)


class ChatSession:
    """A browser tab's conversation with one model; no UI in here. Sessions keep their KV cache
    (or, on ZeroGPU, replay the conversation). Bad input raises before anything changes, with the
    message for the user (:data:`INPUT_ERRORS`). Generators keep a partial answer when closed early."""

    def __init__(self, server: Server, name: str = "chat"):
        self.server, self.name = server, name
        self.vc = server.models[name]
        self._session = None if server.stateless else self.vc.new_session()
        self._conv = Conversation(system=self.vc.config.system)  # the stateless path's conversation
        self._paths: list[list[str]] = []
        self._busy = threading.Lock()
        self.status = "idle"  # idle | generating | done | stopped | failed
        self.error: str | None = None
        self.partial = ""  # the answer so far while generating
        self.last_stats: dict = {}
        self.last_used = 0.0  # time.monotonic() of the last answer's end (the KV-cache budget drops the oldest)
        server.register_chat(self)

    # -- views ---------------------------------------------------------------------------------
    @property
    def conversation(self) -> Conversation:
        return self._conv if self._session is None else self._session.conversation

    @property
    def rounds(self) -> list[ChatRound]:
        out, n = [], 1
        for rnd, paths in zip(self.conversation.rounds, self._paths):
            out.append(ChatRound(rnd.question, list(paths), rnd.answer, n))
            n += len(rnd.images)
        if out and out[-1].answer is None and self.status == "generating":
            out[-1].answer = self.partial if self.partial.strip() else None  # None: nothing to show yet
        return out

    @property
    def image_paths(self) -> list[str]:
        return [p for ps in self._paths for p in ps]

    def prompt_text(self) -> str:
        if self._session is not None:
            return self._session.prompt_text()
        return self.vc.template.render_text(self._conv)

    def cache_bytes(self) -> int:
        """Bytes of this tab's KV cache (0 when it has none)."""
        return cache_bytes(getattr(self._session, "_cache", None))

    def drop_cache(self, blocking: bool = True) -> bool:
        """Free the KV cache (the next round rebuilds it). False when busy and not ``blocking``."""
        if not self._busy.acquire(blocking=blocking):
            return False
        try:
            if self._session is not None:
                self._session.drop_cache()
            return True
        finally:
            self._busy.release()

    def _check(self, gen: dict, question: str | None = None) -> dict:
        """The server's limits on one request, before anything is decoded or run."""
        limits = self.server.limits
        if question is not None and isinstance(question, str):
            check_text(question, "the question", limits.max_question_chars)
        return check_generation(gen, limits)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no answer is being generated (e.g. after a cancelled request's cleanup)."""
        if self._busy.acquire(timeout=timeout):
            self._busy.release()
            return True
        return False

    # -- changes -------------------------------------------------------------------------------
    def send(self, question: str, images: Sequence = (), **gen) -> Iterator[str]:
        """Add a round and return its answer's generator. Raises on bad input, changing nothing."""
        gen = self._check(gen, question)
        with self._exclusive():
            if self._session is not None:
                stream = self._session.stream(question, images, **gen)
            else:
                q = check_question(question)
                GenerationConfig(**gen)
                opened = [open_image(im) for im in images]
                self._close_open_round()
                self._conv.rounds.append(Round(q, opened))
                try:
                    check_fits(self.vc, self._conv)
                except BaseException:
                    self._conv.rounds.pop()
                    raise
                stream = self._replay(gen, new_round=True)
            self._paths.append([self._save(im) for im in self.conversation.rounds[-1].images])
        return self._run(stream)

    def regenerate(self, **gen) -> Iterator[str]:
        gen = self._check(gen)
        with self._exclusive():
            if not self.conversation.rounds:
                raise ValueError("there is no answer to regenerate yet")
            if self._session is not None:
                stream = self._session.regenerate(**gen)
            else:
                GenerationConfig(**gen)
                self._conv.rounds[-1].answer = None
                stream = self._replay(gen, new_round=False)
        return self._run(stream)

    def undo(self) -> ChatRound | None:
        with self._exclusive():
            rounds = self.rounds
            if not rounds:
                return None
            if self._session is not None:
                self._session.undo()
            else:
                self._conv.rounds.pop()
            for p in self._paths.pop():
                _remove(p)
            self.status, self.error = "idle", None
            return rounds[-1]

    def reset(self) -> None:
        with self._exclusive():
            if self._session is not None:
                self._session.reset()
            self._conv = Conversation(system=self.vc.config.system)
            for p in self.image_paths:
                _remove(p)
            self._paths = []
            self.status, self.error, self.last_stats = "idle", None, {}

    def attention_maps(self):
        """Where the last answer looked (:meth:`visualchat.session.Session.attention_maps`): one extra
        forward, after any running answer. On the stateless path the conversation is rebuilt in a
        fresh session for it."""
        with self._exclusive():
            session = self._session
            if session is None:
                rounds = self._conv.rounds
                if not rounds or rounds[-1].answer is None:
                    raise ValueError("there is no answer yet to show where it looked; ask something first")
                session = self.vc.new_session(self._conv.system)
                for r in rounds:
                    session.add_round(r.question, r.images, r.answer)
            return session.attention_maps()

    def close(self) -> None:
        """Free the KV cache and the display copies (the tab is gone)."""
        with contextlib.suppress(Exception):
            self.reset()
        self._session = None

    # -- internals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self, timeout: float = 60.0):
        if not self._busy.acquire(timeout=timeout):
            raise RuntimeError("this chat is still busy with the previous answer; press Stop first")
        try:
            yield
        finally:
            self._busy.release()

    def _close_open_round(self) -> None:
        if self._conv.rounds and self._conv.rounds[-1].answer is None:
            self._conv.rounds[-1].answer = ""

    def _replay(self, gen: dict, new_round: bool) -> Iterator[str]:
        rounds = self._conv.rounds
        rnd = rounds[-1]
        hist = [{"question": r.question, "images": r.images, "answer": r.answer or ""} for r in rounds[:-1]]
        stream = self.server._remote(self.server.key(self.name), hist, rnd.question, rnd.images, dict(gen))

        def pieces():
            text = []
            try:
                for piece in stream:
                    text.append(piece)
                    rnd.answer = "".join(text) if "".join(text).strip() else None
                    yield piece
            except Exception:
                if new_round and not text and rounds and rounds[-1] is rnd:  # failed before its first token: drop the round,
                    rounds.pop()                               # as a stateful session does
                raise
            finally:
                rnd.answer = "".join(text).strip()
                close = getattr(stream, "close", None)
                if close:
                    close()
        return pieces()

    def _run(self, stream: Iterator[str]) -> Iterator[str]:
        """Wrap an answer generator: hold the busy lock while it runs, record status and stats, keep
        the conversation and the display copies in step when the model fails."""
        import time

        limit = self.server.limits.answer_seconds

        def run():
            self._busy.acquire()
            self.status, self.error, self.partial = "generating", None, ""
            finished = False
            deadline = time.monotonic() + limit
            try:
                for piece in stream:
                    self.partial += piece
                    yield piece
                    if time.monotonic() > deadline:  # checked between tokens; the answer so far is kept
                        log.warning("an answer reached the time limit of %g s per answer and was stopped", limit)
                        self.status = "stopped"
                        self.error = f"the answer reached {limit:g} s, this server's limit per answer (--answer-seconds)"
                        break
                else:
                    finished = True
            except GeneratorExit:
                self.status = "stopped"
                raise
            except Exception as e:
                self.status, self.error = "failed", f"{type(e).__name__}: {e}"
                log.exception("generation failed")
                if self._session is not None:
                    self._session.drop_cache()  # a forward that failed half-way may have left it inconsistent
                raise
            finally:
                if hasattr(stream, "close"):
                    stream.close()  # a stopped answer keeps its partial text
                if finished:
                    self.status = "done"
                elif self.status == "generating":
                    self.status = "stopped"
                if self._session is not None:
                    self.last_stats = dict(self._session.last_stats)
                n = len(self.conversation.rounds)
                for ps in self._paths[n:]:  # the model failed before the round was kept
                    for p in ps:
                        _remove(p)
                del self._paths[n:]
                self.last_used = time.monotonic()
                self._busy.release()
                if self._session is not None:
                    self.server.enforce_kv_budget(keep=self)
        return run()

    def _save(self, im) -> str:
        """A display copy of an image in the server's temp folder (which Gradio may serve)."""
        from PIL import Image

        im = im.copy()
        if max(im.size) > DISPLAY_MAX_SIDE:
            im.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
        path = os.path.join(self.server.tmpdir, f"{uuid.uuid4().hex}.png")
        im.save(path, format="PNG", compress_level=1)
        return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


class TabState:
    """What ``gr.State`` holds for one browser tab: its chat and its comparison, created on first
    use. Gradio deep-copies the initial value for every new tab; that copy is a fresh empty state."""

    def __init__(self):
        self.chat: ChatSession | None = None
        self.compare: tuple[ChatSession, ChatSession] | None = None

    def __deepcopy__(self, memo):
        return TabState()

    def get_chat(self, server: Server) -> ChatSession:
        if self.chat is None:
            self.chat = ChatSession(server, "chat")
        return self.chat

    def get_compare(self, server: Server) -> tuple[ChatSession, ChatSession]:
        if self.compare is None:
            self.compare = (ChatSession(server, "ca"), ChatSession(server, "mmca"))
        return self.compare

    def close(self) -> None:
        for c in [self.chat, *(self.compare or ())]:
            if c is not None:
                c.close()
        self.chat = self.compare = None
