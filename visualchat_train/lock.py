"""One run per output directory: ``output_dir/.lock`` holds the owner's pid and host.

A second run that finds a live owner's lock is refused with a message naming it; a lock whose pid
no longer runs on this host (a killed run) is taken over. A lock written on another host cannot be
checked from here: it is refused too, and the message says which file to delete if that run is gone.
"""
from __future__ import annotations

import json
import os
import socket
import time

LOCK_NAME = ".lock"


class OutputDirLocked(RuntimeError):
    """Another run holds the output directory."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def start_ticks(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks after boot, from /proc), or None where unknown: tells
    a reused pid from the lock's owner."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


class OutputLock:
    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.held = False

    def _owner(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "OutputLock":
        os.makedirs(self.output_dir, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "start_ticks": start_ticks(os.getpid())}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                pid, host = owner.get("pid"), owner.get("host")
                if not isinstance(pid, int):  # half-written by a run killed while taking it: stale
                    self._remove_stale()
                    continue
                ticks = owner.get("start_ticks")
                reused = ticks is not None and start_ticks(pid) not in (None, ticks)  # another process, same pid
                if host == me["host"] and (pid == me["pid"] or not pid_alive(pid) or reused):
                    self._remove_stale()  # a dead run's lock (or this process's, left by an earlier call)
                    continue
                where = f"pid {pid} on host {host}" if host != me["host"] else f"pid {pid}"
                raise OutputDirLocked(
                    f"output directory {self.output_dir} is in use by another training run ({where}, started "
                    f"{owner.get('started', '?')}); two runs writing one directory would overwrite each other's "
                    f"checkpoints. Wait for it, stop it, or give another --output_dir"
                    + (f" (if that run is gone, delete {self.path})" if host != me["host"] else "")) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise OutputDirLocked(f"could not take the lock {self.path} (another run keeps taking it)")

    def _remove_stale(self) -> None:
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        if self.held:
            if self._owner().get("pid") == os.getpid():
                self._remove_stale()
            self.held = False

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
