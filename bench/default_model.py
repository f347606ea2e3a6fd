"""Load time, time to first token and decode tokens/s of the embedded default on this machine.

    python bench/default_model.py [--cold] [--rounds 3] [--new_tokens 32]

--cold converts the GGUF into a fresh temporary cache first (the first start after install).
Prints a Markdown table row set for bench/RESULTS.md.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cold", action="store_true", help="also time the first start (GGUF conversion)")
    ap.add_argument("--new_tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image

    rows = []
    if args.cold:
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["VISUALCHAT_CACHE"] = tmp
            from visualchat.assets import default_lm_dir

            t = time.perf_counter()
            default_lm_dir()
            rows.append(("first start: GGUF -> HF conversion", f"{time.perf_counter() - t:.1f} s"))
            del os.environ["VISUALCHAT_CACHE"]
    from visualchat.assets import ASSETS_DIR
    from visualchat.model import VisualChat

    t = time.perf_counter()
    vc = VisualChat.from_pretrained(None, device="cpu")
    rows.append(("load (cached LM + encoder + checkpoint)", f"{time.perf_counter() - t:.2f} s"))
    ims = [Image.open(os.path.join(ASSETS_DIR, "examples", f"shapes_{i}.png")) for i in (1, 2, 3)]
    s = vc.new_session()
    s.ask("Describe Image 1, Image 2 and Image 3.", images=ims, max_new_tokens=args.new_tokens)
    st = s.last_stats
    rows.append((f"round 1, 3 images: time to first token ({st['prefill_tokens']} prompt tokens)",
                 f"{st['ttft_s']:.2f} s"))
    rows.append((f"round 1 decode ({st['new_tokens']} tokens)", f"{st['tokens_per_s']:.1f} tokens/s"))
    s.ask("What color is the star in Image 1?", max_new_tokens=args.new_tokens)
    st = s.last_stats
    rows.append((f"round 2, no new image: time to first token ({st['prefill_tokens']} tokens fed, rest cached)",
                 f"{st['ttft_s']:.2f} s"))
    print(f"device: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| measure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")


if __name__ == "__main__":
    main()
