"""Serving: what one request may cost (:class:`~visualchat.limits.Limits`), what to load and how (:class:`ServeOptions`),
loading the models (:meth:`Server.load`: the chat model, the CA vs MMCA pair, DeepSpeed-Inference
and the ranks through :mod:`visualchat.tensor_parallel`), ZeroGPU, and stateless generation
(:meth:`Server.stream`). A browser tab's conversation is :class:`visualchat.chat_session.ChatSession`;
the web UI (Gradio) is ``app.py`` and the ``webapp`` package beside it, not part of this library.

ZeroGPU
    ``@spaces.GPU`` runs the decorated function in a forked worker and pickles its arguments and
    results, so it cannot carry a session with a KV cache. On ZeroGPU (``SPACES_ZERO_GPU``) the chats
    keep their conversation as plain data and every answer replays it through
    :func:`stream_conversation`, the only decorated function. Off ZeroGPU ``spaces.GPU`` is not used.
"""
from __future__ import annotations

import atexit
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
from .limits import Limits
from .session import Session
from .tensor_parallel import Lockstep, dist_env, init_distributed, wrap_deepspeed

log = logging.getLogger("visualchat.serving")


# ---------------------------------------------------------------------------------------------------
# Checks of one request against the limits (visualchat.limits)


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
    On one CPU rank ``--dtype`` picks the frozen LM's linear-weight format (visualchat.kernels.lowp: ``auto`` is
    the fastest one that keeps the answers, fp16 where the CPU has it) and everything else stays
    float32; on a GPU, on several ranks (AutoTP shards plain linear layers) or with bitsandbytes it is
    the dtype of the whole model, as before (auto: bfloat16 on GPU, float32 on CPU)."""
    dtype = parse_dtype(name)  # validates the name
    if dev_type == "cpu" and world == 1 and not quantization:
        from .kernels.lowp import normalize

        return torch.float32, normalize(name)
    return dtype or (torch.bfloat16 if dev_type == "cuda" else torch.float32), None


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
    the registered model ``key``: a session built from the history, nothing kept. Only plain data in and
    text out, so ``spaces.GPU`` can run it in its forked worker."""
    session = Session.from_history(_REGISTRY[key], history)
    yield from session.stream(question, images, **gen)
    yield {"finish_reason": session.finish_reason}  # the last item: why it ended (AnswerStream reads it)


class AnswerStream:
    """An answer's text pieces (iterate it; ``close()`` stops it) and, once it has ended, why:
    ``finish_reason`` (:data:`visualchat.session.FINISH_REASONS`: ``stop`` or ``length``, ``stopped``
    when closed early). ``pieces`` yields text, and may end with ``{"finish_reason": ...}`` (what
    :func:`stream_conversation` sends back from the GPU worker); else ``session`` says why."""

    def __init__(self, pieces: Iterator, session: Session | None = None):
        self._pieces, self._session, self._reason = pieces, session, None

    def __iter__(self):
        return self

    def __next__(self) -> str:
        piece = next(self._pieces)
        if isinstance(piece, dict):  # stream_conversation's last item
            self._reason = piece.get("finish_reason")
            raise StopIteration
        return piece

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close:
            close()

    @property
    def finish_reason(self) -> str | None:
        return self._session.finish_reason if self._session is not None else self._reason


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
            info = CompareInfo(ca=ca, mmca=mmca, ca_path=ca.path, mmca_path=mmca.path)
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
        with warnings.catch_warnings(record=True) as caught:  # logged with the server's other messages
            warnings.simplefilter("always")
            chat = VisualChat.from_pretrained(opts.checkpoint, lm=opts.lm, vision=opts.vision, device=device,
                                              dtype=dtype, quantization=opts.quantization,
                                              trust_remote_code=opts.trust_remote_code, lm_weights=lm_weights)
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
        if lm_weights is not None:  # the LM's weight format on CPU (visualchat.kernels.lowp), and why if it fell back
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
            if chat.path and os.path.realpath(path) == os.path.realpath(chat.path):
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
    def register_chat(self, chat) -> None:
        with self._chats_lock:
            self._chats.add(chat)

    def kv_cache_bytes(self) -> int:
        """Bytes held by every tab's KV cache now."""
        with self._chats_lock:
            chats = list(self._chats)
        return sum(c.cache_bytes() for c in chats)

    def enforce_kv_budget(self, keep=None) -> int:
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
    def stream(self, name: str, history: list[dict], question: str, images: Sequence, gen: dict) -> AnswerStream:
        """Answer the last round of a whole conversation, nothing kept (the ``/generate`` API): a session
        is built from ``history`` and the round prepared (:meth:`Session.prepare_round`) in this process,
        so bad input raises here before any model (or GPU) time is spent; then the answer streams from
        that session, or on ZeroGPU from the same conversation replayed in the GPU worker."""
        session = Session.from_history(self.models[name], history)
        prepared = session.prepare_round(question, images, **gen)
        if not self.stateless:
            return AnswerStream(session.generate(prepared), session)
        hist = [{"question": r.question, "images": r.images, "answer": r.answer} for r in session.conversation.rounds]
        return AnswerStream(self._remote(self.key(name), hist, prepared.round.question, prepared.round.images,
                                         dict(gen)))


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

