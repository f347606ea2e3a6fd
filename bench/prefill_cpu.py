"""Whole-model prefill of the embedded default LM (SmolLM2-135M, fp32, CPU): SDPA causal vs our MMCA.

    python bench/prefill_cpu.py [--sizes 1024 2048] [--repeats 3]

Layout: 8 images of N/16 tokens each, interleaved with text, so half the tokens are image tokens
(as in issue 7's layout). All variants run in one process, interleaved, and the median is reported.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def layout(n: int, images: int = 8) -> torch.Tensor:
    k = n // (2 * images)
    is_img = torch.zeros(1, n, dtype=torch.bool)
    text = (n - images * k) // images
    for i in range(images):
        start = i * (k + text) + text
        is_img[0, start:start + k] = True
    return is_img


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from visualchat import attention
    from visualchat.model import load_lm

    lm, _ = load_lm("default")
    lm.eval()
    name = attention.register()
    print(f"device: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print("| N | SDPA causal (ms) | ours, causal mode (ms) | ours, MMCA (ms) | MMCA / SDPA |")
    print("|---|---|---|---|---|")
    for n in args.sizes:
        ids = torch.randint(100, 40000, (1, n))
        is_img = layout(n)
        variants = {
            "sdpa": ("sdpa", {}),
            "causal": (name, {"vc_key_is_image": is_img, "vc_attention_mode": "causal"}),
            "mmca": (name, {"vc_key_is_image": is_img, "vc_attention_mode": "mmca"}),
        }
        times = {k: [] for k in variants}
        with torch.no_grad():
            for rep in range(args.repeats + 1):
                for k, (impl, kw) in variants.items():
                    lm.config._attn_implementation = impl
                    t = time.perf_counter()
                    lm.model(input_ids=ids, **kw)
                    if rep:  # the first round is warm-up
                        times[k].append(1000 * (time.perf_counter() - t))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {n} | {med['sdpa']:.0f} | {med['causal']:.0f} | {med['mmca']:.0f} | {med['mmca'] / med['sdpa']:.2f} |")


if __name__ == "__main__":
    main()
