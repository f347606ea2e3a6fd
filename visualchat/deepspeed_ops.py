"""DeepSpeed's JIT-built ops: build none we do not need, and never wait forever on a stale build lock.

DeepSpeed compiles its C++ ops on first use through ``torch.utils.cpp_extension``. A build holds
``<extensions dir>/<op>/lock`` (torch's ``FileBaton``) while it compiles; every other process that
needs the op waits until that file is gone, with no time limit. When a build is interrupted (Ctrl-C,
a kill, a timeout) the file stays, and every later run that needs the op sleeps forever.

- :func:`disable_shm_comm_build` keeps DeepSpeed from building ``deepspeed_shm_comm`` (its
  shared-memory all-reduce, minutes of compiling on a small CPU). Training reduces through
  ``torch.distributed`` and the app routes AutoTP's all-reduce through the process group, so neither
  ever needs it; ``deepspeed.initialize`` would build it anyway (``deepspeed.comm``'s backend does).
- :func:`guard_extension_locks` makes every extension build of this process tell a live build
  (some process runs in the op's build folder: ninja and the compiler run there) from a stale lock
  (nobody has for ``VISUALCHAT_EXTENSION_LOCK_GRACE`` seconds, default 30): it waits for the first
  and raises :class:`StaleExtensionLock`, naming the lock file, for the second.

Importing this module imports neither DeepSpeed nor Gradio.
"""
from __future__ import annotations

import logging
import os
import time

log = logging.getLogger(__name__)

SHM_COMM_OP = "deepspeed_shm_comm"
LOCK_GRACE_ENV = "VISUALCHAT_EXTENSION_LOCK_GRACE"
DEFAULT_LOCK_GRACE_S = 30.0


class StaleExtensionLock(RuntimeError):
    """An extension build lock that no live process holds (left by an interrupted build)."""


def disable_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-building (and using) its shared-memory all-reduce op. Idempotent.

    DeepSpeed builds it only when ``deepspeed.ops.__compatible_ops__`` marks it compatible; the
    module-level ``build_shm_op`` of ``deepspeed.comm.torch`` is also replaced by one that builds
    nothing, in case a DeepSpeed version looks elsewhere."""
    try:
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    except Exception as e:  # an older/newer layout: the patch below still holds
        log.debug("could not mark %s incompatible: %s", SHM_COMM_OP, e)
    try:
        import deepspeed.comm.torch as ds_torch
    except Exception as e:  # pragma: no cover - a DeepSpeed without this module
        log.debug("deepspeed.comm.torch is not importable: %s", e)
        return
    if hasattr(ds_torch, "build_shm_op") and not getattr(ds_torch.build_shm_op, "_visualchat", False):
        def build_shm_op():
            return None

        build_shm_op._visualchat = True
        ds_torch.build_shm_op = build_shm_op


def lock_grace() -> float:
    """Seconds without a live builder before a lock counts as stale (``VISUALCHAT_EXTENSION_LOCK_GRACE``)."""
    raw = os.environ.get(LOCK_GRACE_ENV, "")
    if not raw:
        return DEFAULT_LOCK_GRACE_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{LOCK_GRACE_ENV} must be a number of seconds, got {raw!r}") from None
    if not value >= 0:  # also refuses NaN
        raise ValueError(f"{LOCK_GRACE_ENV} must be >= 0 seconds, got {raw!r}")
    return value


def builders_in(folder: str) -> list[int] | None:
    """Process ids whose working directory is ``folder`` or below it (a JIT build runs ninja and the
    compiler in the op's build folder), or None where ``/proc`` cannot tell."""
    real = os.path.realpath(folder)
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    pids = []
    for e in entries:
        if not e.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{e}/cwd")
        except OSError:  # gone, or not ours to read
            continue
        if cwd == real or cwd.startswith(real + os.sep):
            pids.append(int(e))
    return pids


def wait_for_lock(lock_path: str, grace: float | None = None, poll: float = 0.5) -> None:
    """Return once ``lock_path`` is gone. While some process builds in its folder, keep waiting (with
    a note every 30 s); once nobody has for ``grace`` seconds, raise :class:`StaleExtensionLock`."""
    grace = lock_grace() if grace is None else grace
    folder = os.path.dirname(os.path.abspath(lock_path))
    op = os.path.basename(folder)
    start = idle_since = last_note = time.monotonic()
    while os.path.exists(lock_path):
        now = time.monotonic()
        builders = builders_in(folder)
        if builders:
            idle_since = now
            if now - last_note >= 30:
                log.warning("waiting %.0f s so far for the build of %r (processes %s) to release %s", now - start,
                            op, builders[:5], lock_path)
                last_note = now
        elif now - idle_since >= grace:
            raise StaleExtensionLock(
                f"{lock_path} is a stale lock: it is held, but no process has been building the {op!r} extension "
                f"in {folder} for {grace:.0f} s. An earlier build was interrupted (Ctrl-C, a kill or a timeout) "
                "and left it behind; nothing removes it, and every run that needs this op would wait for it "
                f"forever. Delete it and run again: rm {lock_path!s} (the op is then built afresh). If a process "
                f"this machine cannot see (another container) is building it, wait, or raise {LOCK_GRACE_ENV}.")
        time.sleep(poll)


def guard_extension_locks() -> None:
    """Make every torch C++ extension build in this process (DeepSpeed's JIT ops go through it) use
    :func:`wait_for_lock` instead of torch's endless wait on the build lock. Idempotent."""
    from torch.utils.file_baton import FileBaton

    if getattr(FileBaton.wait, "_visualchat", False):
        return

    def wait(self) -> None:
        wait_for_lock(self.lock_file_path, poll=max(0.1, min(float(self.wait_seconds), 1.0)))

    wait._visualchat = True
    FileBaton.wait = wait
