"""Attention alone: SDPA causal (CA) vs the eager two-softmax reference design vs our mmca_attention
(vs the fused Triton kernel called directly, when there is one).

CPU (the dev machine; fp32, 8 heads x 64)::

    python bench/attention.py --sizes 1024 2048 --repeats 3

GPU (one H100; bf16, LLaMA-2-7B attention shape, 32 heads x 128)::

    python bench/attention.py --sizes 1024 2048 4096 8192 16384 --heads 32 --dim 128 --dtype bf16 \
        --repeats 10 --json bench/results/attention-h100.json

Layout (issue 7): one sequence, 8 images of N/16 tokens interleaved with text. Forward and
forward+backward, median of --repeats after one warm-up call, all variants in one process on the
same inputs. Variants:

- ``SDPA causal``: ``F.scaled_dot_product_attention(is_causal=True)`` over all tokens (the CA baseline);
- ``eager two-softmax``: the reference design: two dense ``[N, N]`` masks and two full softmaxes, as the
  original DeepSpeed-VisualChat code does (its Python mask loop is left out, which only favours it).
  It needs O(N^2) memory, so it is skipped above ``--eager_max`` (the table says so);
- ``ours``: ``visualchat.attention.mmca_attention``, what the model runs (on CUDA it dispatches to the
  fused Triton kernel when ``visualchat.kernels.attention_triton`` provides one);
- ``Triton (direct)``: ``visualchat.kernels.attention_triton.mmca_attention_triton(q, k, v, key_is_image,
  scale=...)`` called directly; only when that module imports and CUDA is present.

Peak memory: on CUDA the ``torch.cuda.max_memory_allocated`` increase over what was allocated before
the call (inputs included in the base, so it is the call's own working memory and its saved
activations/gradients). On CPU it is not measured ("n/a"). ``--json PATH`` also writes every cell.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import write_json  # noqa: E402
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


def triton_direct_fn():
    """``mmca_attention_triton`` wrapped like the other variants, or (None, why not)."""
    if not torch.cuda.is_available():
        return None, "no CUDA"
    try:
        from visualchat.kernels.attention_triton import mmca_attention_triton
    except Exception as e:  # not written yet, triton missing, ...
        return None, f"visualchat.kernels.attention_triton does not import: {type(e).__name__}: {e}"

    def fn(q, k, v, is_img, scale):
        return mmca_attention_triton(q, k, v, is_img, scale=scale)
    return fn, None


LABELS = {"sdpa": "SDPA causal", "eager": "eager two-softmax", "ours": "ours (mmca_attention)",
          "triton": "Triton (direct)"}


def timed(fn, inputs, dev, backward, repeats):
    """Median ms over ``repeats`` calls after one warm-up call; peak extra bytes on CUDA (else None)."""
    times, peak = [], None
    for rep in range(repeats + 1):
        for x in inputs:
            x.grad = None
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
        dt = 1000 * (time.perf_counter() - t)
        if dev.type == "cuda":
            peak = max(peak or 0, torch.cuda.max_memory_allocated() - base)
        del out
        if rep:  # the first call is warm-up (kernel compilation, autotuning, allocator)
            times.append(dt)
    return statistics.median(times), peak


def device_line(dev, args) -> str:
    name = torch.cuda.get_device_name() if dev.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return (f"device: {name}, torch {torch.__version__}, {args.dtype}, {args.heads} heads x {args.dim}, "
            f"median of {args.repeats} after a warm-up, date {datetime.datetime.now().isoformat(timespec='seconds')}")


def run(args) -> dict:
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    variants = {"sdpa": sdpa_causal, "eager": eager_two_softmax, "ours": ours}
    tri, why_not = triton_direct_fn() if dev.type == "cuda" else (None, "not on CUDA")
    if tri is not None:
        variants["triton"] = tri
    result = {"device": device_line(dev, args), "torch": torch.__version__,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "dtype": args.dtype,
              "heads": args.heads, "dim": args.dim, "repeats": args.repeats, "eager_max": args.eager_max,
              "triton_direct": why_not or "measured", "variants": list(variants), "rows": []}
    errors = []
    for n in args.sizes:
        is_img = layout(n).to(dev)
        for backward in (False, True):
            row = {"n": n, "pass": "fwd+bwd" if backward else "fwd", "ms": {}, "peak_mb": {}, "note": {}}
            for key, fn in variants.items():
                if key == "eager" and n > args.eager_max:
                    row["ms"][key], row["peak_mb"][key] = None, None
                    row["note"][key] = f"skipped (N > eager_max {args.eager_max}: N x N memory)"
                    continue
                torch.manual_seed(0)
                qkv = [torch.randn(1, args.heads, n, args.dim, device=dev, dtype=dtype, requires_grad=backward)
                       for _ in range(3)]
                try:
                    with torch.enable_grad() if backward else torch.no_grad():
                        ms, peak = timed(lambda: fn(*qkv, is_img, args.dim ** -0.5), qkv, dev, backward, args.repeats)
                    row["ms"][key], row["peak_mb"][key] = ms, (peak / 2 ** 20 if peak is not None else None)
                except Exception as e:  # e.g. OOM, or a kernel without backward: say so, keep going
                    row["ms"][key], row["peak_mb"][key] = None, None
                    row["note"][key] = f"error: {type(e).__name__}"
                    errors.append(f"N={n} {row['pass']} {LABELS[key]}: {type(e).__name__}: {str(e)[:300]}")
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                qkv = None  # free the inputs before the next variant
            result["rows"].append(row)
    result["errors"] = errors
    return result


def fmt_ms(row, key):
    if row["ms"].get(key) is not None:
        return f"{row['ms'][key]:.2f}"
    return row["note"].get(key, "n/a")


def ratio(row, key):
    a, b = row["ms"].get(key), row["ms"].get("sdpa")
    return f"{a / b:.2f}" if a is not None and b else "n/a"


def table(result) -> str:
    keys = result["variants"]
    head = ["N", "pass"] + [f"{LABELS[k]} (ms)" for k in keys] + [f"{LABELS[k].split(' (')[0]} / SDPA"
                                                                   for k in keys if k in ("ours", "triton")]
    head.append("peak MB (" + " / ".join(LABELS[k].split(" (")[0] for k in keys) + ")")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        cells = [str(row["n"]), row["pass"]] + [fmt_ms(row, k) for k in keys]
        cells += [ratio(row, k) for k in keys if k in ("ours", "triton")]
        cells.append(" / ".join(f"{row['peak_mb'][k]:.0f}" if row["peak_mb"].get(k) is not None else
                                ("skipped" if "skipped" in row["note"].get(k, "") else "n/a") for k in keys))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="sequence lengths N")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64, help="head dimension")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per cell (after one warm-up call)")
    ap.add_argument("--eager_max", type=int, default=8192, help="skip the eager reference above this N (N x N memory)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON here")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    print(result["device"])
    if result["triton_direct"] != "measured":
        print(f"Triton (direct) column left out: {result['triton_direct']}")
    print(table(result))
    for e in result["errors"]:
        print(f"- {e}")
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
