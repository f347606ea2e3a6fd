"""Decode speed of what a front end gets (issue 28): ``VisualChat.from_pretrained()`` with its defaults
(what ``python -m visualchat.chat`` and the app load on CPU), a conversation's first round with 3
images, then ``--new_tokens`` greedy tokens streamed through the public session API; against plain
transformers fp32 decode of the same LM, loaded in the same process (its own forward with its KV
cache, one token at a time, greedy), after a text prompt as long as the session's round 1.
``lm_weights="fp32"`` (the library with its weights as loaded) is measured too.

    python bench/front_end_speed.py [--new_tokens 48] [--repeats 5] [--threads N]

The three run interleaved token by token (a piece of each session's stream, then one transformers
step, and again), so a background load slows them alike; each side's tokens/s counts only the time
spent in its own calls. Decode tokens/s: the tokens after the first (which comes with the prefill)
over that time; the prefills are not timed. The session stops at EOS (the question is one the
shipped checkpoint answers at length), and the table says how many tokens it streamed; transformers
decodes exactly ``--new_tokens``. The ratio is taken per repeat; medians are reported.

It also times the text streamer alone (:class:`visualchat.generation.TextStreamer`) against decoding the
whole answer at every token, as the streamer did before, for answers of 48 and 1,000 tokens.
Prints Markdown for bench/results/.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: a question the shipped checkpoint answers at length (48 tokens and more) with the 3 images attached
QUESTION = "Hey! Who am I talking to?"


def interleaved(sessions: dict, lm, ids, ims, new_tokens: int) -> dict[str, tuple[float, int]]:
    """``{name: (decode tokens/s, tokens)}`` for each of ``sessions`` (name -> VisualChat) streaming the
    round, and ``"hf"`` for transformers' own decode of ``lm`` after ``ids``, run token by token in turn."""
    import torch

    streams = {k: vc.new_session() for k, vc in sessions.items()}
    gens = {k: s.stream(QUESTION, images=ims, max_new_tokens=new_tokens) for k, s in streams.items()}
    for g in gens.values():
        next(g)  # the prefill and the first token (its piece), not timed
    with torch.no_grad():
        out = lm(ids, use_cache=True, logits_to_keep=1)
    cache, tok = out.cache, out.logits[0, -1].argmax()
    spent = dict.fromkeys([*gens, "hf"], 0.0)
    live, steps = set(gens), 0
    while live or steps < new_tokens - 1:
        for k in sorted(live):
            t = time.perf_counter()
            try:
                next(gens[k])
            except StopIteration:
                live.discard(k)
            spent[k] += time.perf_counter() - t
        if steps < new_tokens - 1:
            t = time.perf_counter()
            with torch.no_grad():
                out = lm(tok.view(1, 1), cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[0, -1].argmax()
            spent["hf"] += time.perf_counter() - t
            steps += 1
    rates = {k: ((s.last_stats["new_tokens"] - 1) / spent[k], s.last_stats["new_tokens"]) for k, s in streams.items()}
    rates["hf"] = (steps / spent["hf"], steps + 1)
    return rates


def streamer_cost(tokenizer, ids: list[int], repeats: int = 5) -> tuple[float, float]:
    """Seconds to stream ``ids`` through TextStreamer, and through a full decode of the answer at every
    token (the streamer before issue 28): the best of ``repeats``."""
    from visualchat.generation import TextStreamer

    def windowed():
        s = TextStreamer(tokenizer)
        for i in ids:
            s.push(i)
        return s.text

    def whole():
        text = ""
        for n in range(1, len(ids) + 1):
            t = tokenizer.decode(ids[:n], skip_special_tokens=True)
            if not t.endswith("\ufffd"):
                text = t
        return text

    assert windowed() == whole()
    best = []
    for f in (windowed, whole):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        best.append(min(times))
    return best[0], best[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch's intra-op threads (default: torch's own)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from PIL import Image
    from transformers import AutoModelForCausalLM

    from bench.default_model import LLAMA_PROMPT, fit_prompt
    from visualchat.assets import ASSETS_DIR, default_lm_dir
    from visualchat.model import VisualChat

    ims = [Image.open(os.path.join(ASSETS_DIR, "examples", f"shapes_{i}.png")) for i in (1, 2, 3)]
    fast = VisualChat.from_pretrained(None, device="cpu")  # the default: lm_weights="auto"
    plain = VisualChat.from_pretrained(None, device="cpu", lm_weights="fp32")
    lm = AutoModelForCausalLM.from_pretrained(default_lm_dir(), dtype=torch.float32).eval()
    tok = fast.tokenizer
    s = fast.new_session()
    s.ask(QUESTION, images=ims, max_new_tokens=1)
    n_prompt = s.last_stats["prefill_tokens"]
    ids = torch.tensor([fit_prompt(lambda t: tok(t, add_special_tokens=False).input_ids, *LLAMA_PROMPT, n_prompt)])

    interleaved({"fast": fast, "plain": plain}, lm, ids, ims, 4)  # warm-up
    runs = [interleaved({"fast": fast, "plain": plain}, lm, ids, ims, args.new_tokens) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k][0] for r in runs) for k in ("fast", "plain", "hf")}
    tokens = statistics.median(r["fast"][1] for r in runs)
    ratio = statistics.median(r["fast"][0] / r["hf"][0] for r in runs)
    ratio_plain = statistics.median(r["plain"][0] / r["hf"][0] for r in runs)
    answer = fast.new_session().ask(QUESTION, images=ims, max_new_tokens=args.new_tokens)

    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; device: "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"\nround 1: {QUESTION!r} with 3 images ({n_prompt} prompt tokens), then up to {args.new_tokens} greedy tokens; "
          f"{args.repeats} repeats, the three interleaved token by token; medians\n")
    print("| path | decode tokens/s | / transformers fp32 |\n|---|---|---|")
    print(f"| `VisualChat.from_pretrained()` default ({fast.lm_weights} weights), session stream "
          f"({tokens:.0f} tokens) | {med['fast']:.1f} | {ratio:.2f}x |")
    print(f"| `from_pretrained(lm_weights=\"fp32\")`, session stream | {med['plain']:.1f} | {ratio_plain:.2f}x |")
    print(f"| transformers, fp32, the LM's forward with its KV cache, text prompt of {n_prompt} tokens ({args.new_tokens} tokens) "
          f"| {med['hf']:.1f} | 1.00x |")
    per_repeat = ", ".join(f"{r['fast'][0] / r['hf'][0]:.2f}" for r in runs)
    print(f"\nper repeat, default / transformers: {per_repeat}")
    print(f"the default's answer: {answer!r}")

    text = "Image 1 has a red circle, a blue square and two stars; naïve café 🙂. " * 40
    all_ids = tok(text, add_special_tokens=False).input_ids
    print("\n| answer length | TextStreamer | full decode per token | ratio |\n|---|---|---|---|")
    for n in (48, 1000):
        w, f = streamer_cost(tok, all_ids[:n])
        print(f"| {n} tokens | {1e3 * w:.2f} ms | {1e3 * f:.2f} ms | {f / w:.1f}x |")


if __name__ == "__main__":
    main()
