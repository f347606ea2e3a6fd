"""Peak memory per rank when ZeRO-3 loads and trains a large LM, against the whole model's size and
``python -m visualchat_train.memory``'s planner figure for the same setting.

A random LLaMA of about 1 B parameters (``--hidden 2048 --layers 18 --intermediate 5632 --vocab 32000``
by default: 1.06 B) is saved as sharded safetensors with a tokenizer in a temporary folder, so the
trainer reads it exactly as it reads a real checkpoint. Then, on ``--nproc`` gloo ranks:

1. ``load``: each rank runs the trainer's ``preflight`` and ``build_model`` under ZeRO-3 (the LM built
   partitioned, ``deepspeed.zero.Init`` in the run's precision) and reports its peak RSS (``VmHWM``);
2. ``train``: ``torchrun --nproc_per_node N -m visualchat_train ... --engine deepspeed --zero_stage 3`` for
   ``--steps`` optimizer steps on short shapes conversations (tiny random CLIP encoder), each rank's
   peak RSS read from ``/proc/<pid>/status`` by a watcher in this process;
3. ``load-zero2`` (unless ``--no_zero2``): the same load as 1 under ZeRO-2, where every rank loads the
   whole LM in fp32: the contrast.

The ranks run with glibc's allocator told to give freed memory back (``MALLOC_ENV``; ``--no_malloc_env``
leaves glibc's defaults). Every figure is resident memory of the whole process: it includes the Python, torch, transformers and
DeepSpeed runtime (measured alone as ``runtime``: a process that imports the trainer and stops) and,
for the rank that copies the checkpoint in, file-backed pages of the memory-mapped safetensors files
(the OS may drop those; ``anon`` is the sampled peak of anonymous memory, which it may not).

    python bench/zero3_load.py --json bench/results/zero3-load-cpu.json
    python bench/zero3_load.py --layers 2 --hidden 256 --intermediate 512 --vocab 1000 --steps 1   # quick check
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import busy  # noqa: E402

GiB = 1024 ** 3


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process in bytes (from /proc/<pid>/status)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def make_checkpoint(folder: str, a) -> dict:
    """A random LLaMA saved as sharded safetensors + the tiny test tokenizer; returns its sizes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from visualchat_train.tiny import build_tokenizer

    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.save_dtype]
    torch.manual_seed(0)
    lm = LlamaForCausalLM._from_config(cfg, dtype=dtype)
    n = sum(p.numel() for p in lm.parameters())
    lm.save_pretrained(folder, max_shard_size="500MB")  # sharded safetensors, as on the hub
    tok.save_pretrained(folder)
    del lm
    return checkpoint_sizes(folder, n)


def checkpoint_sizes(folder: str, n: int | None = None) -> dict:
    """Parameters (counted from the safetensors headers unless given), fp32 size, files of a saved LM."""
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if n is None:
        from safetensors import safe_open

        n = 0
        for f in files:
            with safe_open(os.path.join(folder, f), framework="pt") as st:
                for k in st.keys():
                    shape = st.get_slice(k).get_shape()
                    n += math.prod(shape)
    return {"params": n, "fp32_bytes": 4 * n, "files": len(files),
            "file_bytes": sum(os.path.getsize(os.path.join(folder, f)) for f in files)}


class Watcher(threading.Thread):
    """Samples every rank process under a launcher (found by RANK in its environment)."""

    def __init__(self, launcher_pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.launcher, self.every, self.stop = launcher_pid, every, threading.Event()
        self.ranks: dict[int, dict[str, int]] = {}

    def _children(self):
        import psutil

        try:
            return psutil.Process(self.launcher).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def run(self):
        while not self.stop.is_set():
            for child in self._children():
                try:
                    with open(f"/proc/{child.pid}/environ", "rb") as f:
                        env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
                    if b"LOCAL_RANK" not in env or b"RANK" not in env:
                        continue
                    st = proc_status(child.pid)
                except (OSError, ValueError):
                    continue
                r = self.ranks.setdefault(int(env[b"RANK"]), {"pid": child.pid, "hwm": 0, "anon": 0, "rss": 0})
                r["hwm"] = max(r["hwm"], st.get("VmHWM", 0))
                r["anon"] = max(r["anon"], st.get("RssAnon", 0))
                r["rss"] = max(r["rss"], st.get("VmRSS", 0))
            self.stop.wait(self.every)


#: extra environment of the rank processes (``--env``, and MALLOC_ENV unless ``--no_malloc_env``)
CHILD_ENV: dict[str, str] = {}
#: glibc's allocator returns freed memory to the OS: blocks of 1 MiB and more are mmapped (a fixed
#: threshold: by default it grows to 32 MiB as such blocks are freed, and ZeRO-3's gathered tensors
#: then stay in the heap after release) and the heap's top is trimmed on every free. Measured on a
#: 0.17 B LLaMA (bench/RESULTS.md): training peak RSS per rank 1.50 GiB with it, 1.95-2.06 without.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "0"}


def _env() -> dict:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""), "DS_ACCELERATOR": "cpu",
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1")})
    return env


def launch(args: list[str], nproc: int, log_path: str, timeout: float) -> tuple[int, dict, float]:
    """torchrun ``args`` on ``nproc`` ranks with a watcher; (return code, per-rank peaks, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", _port(), *args]
    t0 = time.time()
    with open(log_path, "w") as log:
        p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        w = Watcher(p.pid)
        w.start()
        try:
            rc = p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()
            rc = p.wait()
        w.stop.set()
        w.join()
    return rc, w.ranks, time.time() - t0


def train_flags(a, lm_dir: str, out: str, zero_stage: int) -> list[str]:
    return ["--lm", lm_dir, "--vision", "tiny", "--attention", "mmca", "--dataset_names", "shapes",
            "--dataset_samples", str(a.samples), "--val_ratio", "0.25", "--max_seq_len", str(a.seq_len),
            "--per_device_batch_size", "1", "--global_batch_size", str(a.nproc), "--max_steps", str(a.steps),
            "--eval_every", "0", "--save_every", "0", "--lr", "1e-3", "--engine", "deepspeed",
            "--zero_stage", str(zero_stage), "--precision", a.precision, "--output_dir", out, "--no_progress",
            "--resume", "none"] + (["--deepspeed_config", a.deepspeed_config] if a.deepspeed_config else [])


def probe_rank(flags: list[str], out_json: str) -> None:
    """(In a rank.) The trainer's model build only, then this rank's peak RSS and its LM share."""
    from visualchat_train import cli, dist as D, trainer as T

    args = cli.parse_args(flags)
    plan = T.preflight(args)
    D.init()
    t0 = time.time()
    vcm, _, _ = T.build_model(args, plan, T.deepspeed_config(args, plan))
    seconds = time.time() - t0
    lm = list(vcm.lm.parameters())
    st = proc_status()
    res = {"rank": plan.rank, "hwm": st["VmHWM"], "rss": st["VmRSS"], "anon": st["RssAnon"], "seconds": seconds,
           "lm_full": sum(int(getattr(p, "ds_numel", p.numel())) for p in lm),
           "lm_local": sum(int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else p.numel() for p in lm),
           "lm_dtype": str(lm[0].dtype)}
    with open(out_json.format(rank=plan.rank), "w") as f:
        json.dump(res, f)
    D.barrier()


def runtime_baseline() -> int:
    """VmHWM of a process that imports what a rank imports (torch, transformers, deepspeed, the trainer)."""
    code = ("import deepspeed, transformers, torch, visualchat_train.trainer, visualchat.model; "
            "from bench.zero3_load import proc_status; print(proc_status()['VmHWM'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-2000:])
    return int(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    from visualchat_train.trainer import bf16_supported

    import torch

    auto_precision = "bf16" if bf16_supported(torch.device("cpu")) else "fp32"
    p = argparse.ArgumentParser(prog="python bench/zero3_load.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=18)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=16)
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=auto_precision,
                   help="the run's --precision (default: bf16 where this CPU supports it)")
    p.add_argument("--save_dtype", choices=("fp32", "bf16", "fp16"), default="bf16",
                   help="dtype of the saved checkpoint (LLaMA-2's hub checkpoints are half precision)")
    p.add_argument("--nproc", type=int, default=2, help="ranks (gloo, CPU)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of the training run")
    p.add_argument("--seq_len", type=int, default=128, help="--max_seq_len of the training run")
    p.add_argument("--samples", type=int, default=16, help="shapes conversations generated")
    p.add_argument("--no_zero2", action="store_true", help="skip the ZeRO-2 load (whole LM in fp32 on every rank)")
    p.add_argument("--no_train", action="store_true", help="loads only, no training run")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per torchrun phase")
    p.add_argument("--workdir", default=None, help="keep the checkpoint and logs here (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--deepspeed_config", default=None,
                   help="passed to the trainer (its keys override the generated DeepSpeed config), e.g. to compare "
                        "with DeepSpeed's default ZeRO-3 gathering limits")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in the rank processes' environment (repeatable), e.g. MALLOC_TRIM_THRESHOLD_=0")
    p.add_argument("--reuse_checkpoint", action="store_true",
                   help="use the LM already saved under --workdir/lm by an earlier run instead of making one")
    p.add_argument("--no_malloc_env", action="store_true",
                   help="run the ranks without " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
                        + " (glibc then keeps freed memory in the process)")
    a = p.parse_args(argv)
    if not a.no_malloc_env:
        CHILD_ENV.update(MALLOC_ENV)
    for kv in a.env:
        key, eq, value = kv.partition("=")
        if not eq or not key:
            p.error(f"--env {kv!r}: expected KEY=VALUE")
        CHILD_ENV[key] = value

    from bench.common import write_json
    from visualchat_train import memory

    work = a.workdir or tempfile.mkdtemp(prefix="zero3-load-")
    os.makedirs(work, exist_ok=True)
    res: dict = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                 "busy": busy(), "command": "python bench/zero3_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                 "precision": a.precision, "nproc": a.nproc, "child_env": dict(CHILD_ENV),
                 "deepspeed_config": a.deepspeed_config, "phases": {}}
    try:
        lm_dir = os.path.join(work, "lm")
        os.makedirs(lm_dir, exist_ok=True)
        t0 = time.time()
        if a.reuse_checkpoint and os.path.isfile(os.path.join(lm_dir, "config.json")):
            res["model"] = checkpoint_sizes(lm_dir)  # made by an earlier run (its shape flags are ignored)
        else:
            res["model"] = make_checkpoint(lm_dir, a)
        res["model"]["save_seconds"] = time.time() - t0
        print(f"random LLaMA: {res['model']['params'] / 1e9:.3f} B params, fp32 {res['model']['fp32_bytes'] / GiB:.2f} GiB, "
              f"{res['model']['files']} safetensors files ({a.save_dtype}, {res['model']['file_bytes'] / GiB:.2f} GiB)", flush=True)
        res["runtime_hwm"] = runtime_baseline()
        shape, vis = memory.lm_shape(lm_dir), memory.vision_shape("tiny")
        for stage in (3, 2):
            e = memory.estimate(shape, vis, stage, a.nproc, a.precision)
            res[f"planner_zero{stage}"] = {"load_peak": e["load_peak"], "per_gpu": e["per_gpu"]}
        res["zero3_settings"] = memory.zero3_live_settings(shape)  # what the trainer writes (before --deepspeed_config)

        phases = [("load", 3, "probe")] + ([] if a.no_train else [("train", 3, "train")]) \
            + ([] if a.no_zero2 else [("load-zero2", 2, "probe")])
        for name, stage, kind in phases:
            out = os.path.join(work, "run-" + name)
            flags = train_flags(a, lm_dir, out, stage)
            log_path = os.path.join(work, name + ".log")
            if kind == "probe":
                rank_json = os.path.join(work, name + "-rank{rank}.json")
                rc, peaks, secs = launch([os.path.abspath(__file__), "--_probe", rank_json, "--", *flags], a.nproc,
                                         log_path, a.timeout)
                if rc == 0:
                    for r in range(a.nproc):
                        with open(rank_json.format(rank=r)) as f:
                            peaks.setdefault(r, {}).update({"probe": json.load(f)})
            else:
                rc, peaks, secs = launch(["-m", "visualchat_train", *flags], a.nproc, log_path, a.timeout)
            if rc != 0:
                with open(log_path) as f:
                    tail = f.read()[-3000:]
                raise SystemExit(f"phase {name} failed ({rc}); log {log_path}:\n{tail}")
            res["phases"][name] = {"zero_stage": stage, "seconds": secs, "ranks": {str(r): v for r, v in sorted(peaks.items())}}
            print(f"{name}: done in {secs:.0f} s", flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)
    print_table(res)
    write_json(a.json, res)
    return res


def _peak(rank: dict) -> int:
    """The rank's true peak RSS: the probe's own VmHWM where it wrote one, else the watcher's last VmHWM."""
    return max(rank.get("hwm", 0), rank.get("probe", {}).get("hwm", 0))


def print_table(res: dict) -> None:
    m = res["model"]
    print(f"\n{res['date']}, {res['machine']}{' (busy: a training run shared the CPU)' if res['busy'] else ''}; "
          f"{m['params'] / 1e9:.3f} B-parameter LLaMA, --precision {res['precision']}, {res['nproc']} gloo ranks")
    print(f"whole LM in fp32: {m['fp32_bytes'] / GiB:.2f} GiB; runtime alone (imports, no model): "
          f"{res['runtime_hwm'] / GiB:.2f} GiB")
    print(f"\n{'phase':<11} {'rank':>4} {'peak RSS':>9} {'anon':>7} {'vs fp32 LM':>10} {'planner':>8} {'time':>7}  (GiB)")
    for name, ph in res["phases"].items():
        plan = res[f"planner_zero{ph['zero_stage']}"]
        fig = plan["per_gpu"] if name == "train" else plan["load_peak"]
        for r, v in ph["ranks"].items():
            peak = _peak(v)
            print(f"{name:<11} {r:>4} {peak / GiB:9.2f} {v.get('anon', 0) / GiB:7.2f} {peak / m['fp32_bytes']:10.2f} "
                  f"{fig / GiB:8.2f} {ph['seconds']:6.0f}s")
    print("\nplanner: the load peak per GPU (load phases) or the model states per GPU (train), without the runtime; "
          "anon: sampled peak of anonymous memory")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_probe":  # one rank of a load phase (launched by main)
        probe_rank(sys.argv[4:], sys.argv[2])
    else:
        main()
