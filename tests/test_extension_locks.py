"""DeepSpeed's JIT-built ops (issue 20): training builds none it does not need, and a build lock left by an
interrupted build is refused with a message naming it, never waited on forever."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.test_train_run import ROOT, _env
from visualchat.deepspeed_ops import LOCK_GRACE_ENV, SHM_COMM_OP, StaleExtensionLock, builders_in, wait_for_lock

BUILD = """
import os, sys
import torch.utils.cpp_extension as ext
from visualchat.deepspeed_ops import guard_extension_locks
if sys.argv[2] == "guarded":
    guard_extension_locks()
try:
    ext.load(name="vc_lock_probe", sources=[sys.argv[1]], build_directory=os.path.dirname(sys.argv[1]))
except Exception as e:
    print(type(e).__name__ + ": " + str(e))
    sys.exit(3)
"""


def stale_build_folder(tmp_path, name="vc_lock_probe"):
    folder = tmp_path / name
    folder.mkdir(parents=True)
    (folder / "probe.cpp").write_text("int probe() { return 1; }\n")
    (folder / "lock").write_text("")  # what torch's FileBaton leaves when its build is killed
    return folder


def test_stale_build_lock_is_refused_naming_the_lock(tmp_path):
    """torch.utils.cpp_extension.load (what DeepSpeed's op builders call) with a lock nobody holds: torch
    alone sleeps forever; guarded, it stops after the grace period and names the lock file."""
    folder = stale_build_folder(tmp_path)
    env = _env(**{LOCK_GRACE_ENV: "1"})
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", BUILD, str(folder / "probe.cpp"), "guarded"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, p.stdout + p.stderr[-2000:]
    assert p.stdout.startswith("StaleExtensionLock: ") and str(folder / "lock") in p.stdout
    assert "rm " + str(folder / "lock") in p.stdout and "interrupted" in p.stdout
    assert time.time() - t0 < 45
    assert (folder / "lock").exists()  # explained, not deleted behind the user's back
    # without the guard the same call is still waiting when we give up on it
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([sys.executable, "-c", BUILD, str(folder / "probe.cpp"), "plain"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=8)


def test_a_live_build_is_waited_for(tmp_path):
    """A lock whose folder has a process working in it (ninja/the compiler of another run) is a live
    build: the guard waits for its release, however long the grace period is exceeded."""
    folder = stale_build_folder(tmp_path)
    builder = subprocess.Popen(["sleep", "30"], cwd=folder)
    try:
        assert builder.pid in builders_in(str(folder))
        threading.Timer(2.0, os.remove, args=[str(folder / "lock")]).start()
        t0 = time.time()
        wait_for_lock(str(folder / "lock"), grace=0.3, poll=0.1)
        assert time.time() - t0 >= 1.5
    finally:
        builder.kill()
        builder.wait()
    (folder / "lock").write_text("")
    with pytest.raises(StaleExtensionLock, match="stale lock"):
        wait_for_lock(str(folder / "lock"), grace=0.3, poll=0.1)


def test_interrupted_start_then_next_run_succeeds(tmp_path):
    """A DeepSpeed-engine run is killed mid-start (after it built the model, where it used to JIT-build the
    shm all-reduce op for minutes) and its interrupted build's lock is there; the next run trains anyway,
    and builds no op."""
    ext = tmp_path / "torch_extensions"
    env = _env(TORCH_EXTENSIONS_DIR=str(ext), OMP_NUM_THREADS="1")
    flags = ["--engine", "deepspeed", "--zero_stage", "0", "--dataset_samples", "24", "--max_steps", "2",
             "--eval_every", "0", "--no_progress"]
    cmd = [sys.executable, "-m", "visualchat_train", "--preset", "smoke", *flags]
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(cmd + ["--output_dir", str(tmp_path / "first")], cwd=ROOT, env=env, stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 60
        while "trainable" not in log.read_text() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert "trainable" in log.read_text(), log.read_text()[-3000:]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    (ext / SHM_COMM_OP).mkdir(parents=True, exist_ok=True)
    (ext / SHM_COMM_OP / "lock").touch()  # as a build killed mid-compile leaves it
    t0 = time.time()
    second = subprocess.run(cmd + ["--output_dir", str(tmp_path / "second")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=150)
    assert second.returncode == 0, second.stderr[-4000:]
    assert (tmp_path / "second" / "final" / "config.json").is_file()
    assert not [p for p in ext.rglob("*.so")], "an extension op was built"
    assert time.time() - t0 < 150
