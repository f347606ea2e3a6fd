"""Attention alone: SDPA causal (CA) vs the eager two-softmax reference design vs our mmca_attention.

    python bench/attention.py                       # CPU: small N, fp32, 8 heads x 64
    python bench/attention.py --sizes 1024 2048 4096 8192 16384 --heads 32 --dim 128 --dtype bf16  # GPU

Layout (issue 7): one sequence, 8 images of N/16 tokens interleaved with text. Forward and
forward+backward, median of --repeats after a warm-up, all variants in one process; peak extra
memory on CUDA. The eager reference builds two dense [N, N] masks and two full softmaxes, as the
original DeepSpeed-VisualChat code does (its Python mask loop is left out, which only favours it).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.prefill_cpu import layout  # noqa: E402
from visualchat.attention import build_masks, mmca_attention  # noqa: E402


def eager_two_softmax(q, k, v, is_img, scale):
    text_mask, img_mask = build_masks(is_img, q.shape[2])
    s = (q @ k.transpose(-1, -2)) * scale  # [B, H, N, N]
    out = 0
    for m in (text_mask, img_mask):
        w = torch.softmax(s.masked_fill(~m[:, None], float("-inf")), -1).nan_to_num(0.0)
        out = out + w @ v
    return out


def sdpa_causal(q, k, v, is_img, scale):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def ours(q, k, v, is_img, scale):
    return mmca_attention(q, k, v, is_img, scale=scale)


def timed(fn, dev, backward, repeats):
    times, peak = [], 0
    for rep in range(repeats + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        if backward:
            out.sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
            peak = max(peak, torch.cuda.max_memory_allocated() - base)
        if rep:
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times), peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--eager_max", type=int, default=8192, help="skip the eager reference above this N")
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"device: {name}, torch {torch.__version__}, {args.dtype}, {args.heads} heads x {args.dim}")
    print("| N | pass | SDPA causal (ms) | eager two-softmax (ms) | ours (ms) | ours / SDPA | peak MB (SDPA / eager / ours) |")
    print("|---|---|---|---|---|---|---|")
    variants = {"sdpa": sdpa_causal, "eager": eager_two_softmax, "ours": ours}
    for n in args.sizes:
        is_img = layout(n).to(dev)
        for backward in (False, True):
            res = {}
            for key, fn in variants.items():
                if key == "eager" and n > args.eager_max:
                    res[key] = (float("nan"), 0)
                    continue
                torch.manual_seed(0)
                q, k, v = (torch.randn(1, args.heads, n, args.dim, device=dev, dtype=dtype, requires_grad=backward)
                           for _ in range(3))
                ctx = torch.enable_grad() if backward else torch.no_grad()
                with ctx:
                    res[key] = timed(lambda: fn(q, k, v, is_img, args.dim ** -0.5), dev, backward, args.repeats)
            mem = " / ".join(f"{res[k][1] / 2**20:.0f}" if dev.type == "cuda" else "n/a" for k in variants)
            print(f"| {n} | {'fwd+bwd' if backward else 'fwd'} | {res['sdpa'][0]:.2f} | {res['eager'][0]:.2f} | "
                  f"{res['ours'][0]:.2f} | {res['ours'][0] / res['sdpa'][0]:.2f} | {mem} |")


if __name__ == "__main__":
    main()
