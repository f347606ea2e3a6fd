"""What is served and how it is loaded: the options (:class:`ServeOptions`, from which ``app.py`` builds its
flags), the dtype plan, and the :class:`Server`: the chat model and the CA vs MMCA pair (:meth:`Server.load`,
with DeepSpeed-Inference and the ranks through :mod:`visualchat.tensor_parallel`), the limits of one
request, ZeroGPU's replay function and the KV-cache budget shared by the served conversations
(:class:`visualchat.served.ServedConversation`). The web UI (Gradio) is ``app.py`` and the ``webapp``
package beside it, not part of this library.
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
from typing import Any, Literal, Sequence

import torch

from .assets import DEFAULT_CA_CHECKPOINT, DEFAULT_CHECKPOINT, shipped_checkpoint
from .config import VisualChatConfig
from .limits import Limits
from .tensor_parallel import Lockstep, dist_env, init_distributed, wrap_deepspeed
from .zerogpu import gpu_decorator, register, stream_conversation, zero_gpu_active

log = logging.getLogger("visualchat.serving")


def _option(default, help: str, env: str | None = None, **meta):
    """A serving option's field: its default, its help text and the environment variable that sets it."""
    return field(default=default, metadata={"help": help, **({"env": env} if env else {}), **meta})


@dataclass
class ServeOptions:
    """What to load and how to run it. ``app.py`` builds a flag from each field (:mod:`visualchat.flags`),
    its default from the field's environment variable."""

    checkpoint: str | None = _option(
        None, "checkpoint directory for the Chat tab; default: the shipped assets/checkpoints/shapes-mmca, else an "
        "untrained projection", "VISUALCHAT_CHECKPOINT", metavar="DIR")
    lm: str | None = _option(None, "base LM (HF id or local path) instead of the one the checkpoint names; default: "
                             "the embedded SmolLM2-135M-Instruct", "VISUALCHAT_LM", metavar="ID_OR_PATH")
    vision: str | None = _option(None, "vision encoder spec (efficientnet-lite0, clip:PATH, qwen-vl:DIR) instead of "
                                 "the checkpoint's", "VISUALCHAT_VISION", metavar="SPEC")
    ca_checkpoint: str | None = _option(None, "CA-trained checkpoint for the Compare tab; default: "
                                        "assets/checkpoints/shapes-ca", "VISUALCHAT_CA_CHECKPOINT", metavar="DIR")
    mmca_checkpoint: str | None = _option(None, "MMCA-trained checkpoint for the Compare tab; default: "
                                          "assets/checkpoints/shapes-mmca", "VISUALCHAT_MMCA_CHECKPOINT", metavar="DIR")
    compare: bool = _option(True, "do not load the Compare tab's models (or set the variable to 0)", "VISUALCHAT_COMPARE")
    trust_remote_code: bool = _option(False, "allow custom modeling code from the LM's repository",
                                      "VISUALCHAT_TRUST_REMOTE_CODE")
    device: str | None = _option(None, "cpu, cuda or cuda:N; default: cuda if available (cuda:LOCAL_RANK per rank), "
                                 "else cpu", "VISUALCHAT_DEVICE")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = _option(
        "auto", "GPU: the model's dtype (auto: bfloat16); one CPU rank: the LM's weight format (auto: float16 where "
        "supported, fastest with the same answers)", "VISUALCHAT_DTYPE")
    quantization: Literal["4bit", "8bit"] | None = _option(
        None, "load the LM in 4 or 8 bit with bitsandbytes (GPU; DeepSpeed-Inference is then not used)",
        "VISUALCHAT_LOAD_IN", flags=("--load-in", "--quantization"))
    deepspeed: Literal["auto", "on", "off"] = _option(
        "auto", "wrap the LM with DeepSpeed-Inference (kernel injection off; AutoTP over the launcher's ranks). auto: "
        "if DeepSpeed loads, else plain PyTorch (logged)", "VISUALCHAT_DEEPSPEED")
    tp_allreduce: Literal["gloo", "shm"] = _option(
        "gloo", "how AutoTP all-reduces across ranks: gloo = torch.distributed on the process group (safe under any "
        "launcher); shm = DeepSpeed's shared-memory CPU kernel (faster, one machine; its first JIT build takes over "
        "a minute)", "VISUALCHAT_TP_ALLREDUCE")
    limits: Limits | None = _option(None, "the limits of one request; None: Limits.from_env()")


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
        self._chats: weakref.WeakSet = weakref.WeakSet()  # the served conversations (for the KV-cache budget)
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
            register(self.key(name), vc)
        #: on ZeroGPU, what answers a conversation's last round in the GPU worker (visualchat.zerogpu)
        self.replay = gpu_decorator()(stream_conversation) if self.stateless else None
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
