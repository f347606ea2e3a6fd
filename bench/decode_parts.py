"""Two measurements behind a choice in the embedded default's decode path (issue 18, bench/RESULTS.md):
whether speculative decoding by prompt lookup would pay for itself.

    python bench/decode_parts.py --batch                       # what M tokens per forward cost
    python bench/decode_parts.py --lookup RESULT.json [--draft 2 3 4 6]

--batch times one decode step's matrix products (``bench.default_model.matmul_calls``: the lean
step's fbgemm calls, default checkpoint, the format ``auto`` picks) with M = 1, 2, 3, 4, 6, 8 rows at
once: verifying k drafted tokens costs one forward with M = k + 1 instead of one with M = 1.

--lookup replays a saved ``python -m visualchat_train.eval ... --out RESULT.json`` (the shapes test set: its
conversations are regenerated from the result's seed and size, the model's own answers taken from the
file): every answer token after the first is drafted by prompt lookup (the longest of the last 3..1
tokens found earlier in the conversation's text, the next ``--draft`` tokens after it) and checked
against what greedy decoding did produce. Prints the tokens one forward would give on average
(accepted drafts + the one token every forward yields). Image tokens are never drafted from.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def draft(history: list[int], k: int, longest: int = 3) -> list[int]:
    """Prompt lookup: the ``k`` tokens that followed the latest earlier occurrence of the longest end
    (``longest``..1 tokens) of ``history``; [] when none recurs. -1 (an image slot) never matches."""
    for n in range(min(longest, len(history) - 1), 0, -1):
        tail = history[-n:]
        if -1 in tail:
            continue
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == tail:
                guess = history[start + n:start + n + k]
                return guess[:guess.index(-1)] if -1 in guess else guess
    return []


def forwards_for(context: list[int], answer: list[int], k: int) -> int:
    """Forwards needed after the prefill (which gives the first token) to produce ``answer`` when each
    forward checks up to ``k`` drafted tokens: it keeps the drafts that match, then adds one token."""
    pos, passes = 1, 0
    while pos < len(answer):
        guess = draft(context + answer[:pos], k)
        ok = 0
        while ok < len(guess) and pos + ok < len(answer) and guess[ok] == answer[pos + ok]:
            ok += 1
        pos += ok + 1
        passes += 1
    return passes


def lookup(result_path: str, drafts: list[int]) -> None:
    from visualchat_train.data.shapes import generate
    from visualchat.model import VisualChat

    res = json.load(open(result_path))
    vc = VisualChat.from_pretrained(None, device="cpu")
    t = vc.template
    samples = generate("test", res["n_conversations"], res["seed"], drawing=res.get("drawing", "plain"))
    answers = iter(res["answers"])
    rounds = []  # (text before the answer, answer ids with EOS)
    for s in samples:
        conv = s.conversation
        hist, first = list(t.render_system(conv.system).input_ids), 1
        for rnd in conv.rounds:
            ids = t.answer_ids(next(answers)) + [t.eos_id]
            r = t.render_round(rnd, first, answer_ids=ids)  # the round as the next one sees it
            first += len(rnd.images)
            text = [-1 if img else tok for tok, img in zip(r.input_ids, r.is_image)]
            rounds.append((hist + text[:r.answer_starts[0]], ids))
            hist += text
    tokens = sum(len(a) - 1 for _, a in rounds)
    print(f"{len(rounds)} rounds of {res['n_conversations']} conversations ({result_path}); "
          f"{tokens} answer tokens after the first (median answer {statistics.median(len(a) for _, a in rounds)} tokens)")
    print("\n| draft length | forwards | tokens per forward |\n|---|---|---|")
    for k in drafts:
        passes = sum(forwards_for(c, a, k) for c, a in rounds)
        print(f"| {k} | {passes} | {tokens / max(passes, 1):.2f} |")


def batch() -> None:
    import torch

    from bench.default_model import matmul_calls
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(None, device="cpu", lm_weights="auto")
    calls = matmul_calls(vc)
    print(f"{vc.lm_weights} weights, {len(calls)} products per step, {torch.get_num_threads()} threads\n")
    print("| rows at once (M) | the step's products (ms, median of 10) | / M = 1 |\n|---|---|---|")
    base = None
    with torch.no_grad():
        for m in (1, 2, 3, 4, 6, 8):
            xs = {n: torch.randn(m, n) for n in {n for _, n in calls}}
            times = []
            for _ in range(11):
                t0 = time.perf_counter()
                for f, n in calls:
                    f(xs[n])
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times[1:]) * 1e3
            base = base or ms
            print(f"| {m} | {ms:.1f} | {ms / base:.2f}x |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", action="store_true")
    ap.add_argument("--lookup", metavar="RESULT.json")
    ap.add_argument("--draft", type=int, nargs="+", default=[2, 3, 4, 6])
    args = ap.parse_args()
    if not (args.batch or args.lookup):
        ap.error("say --batch and/or --lookup RESULT.json")
    if args.batch:
        batch()
    if args.lookup:
        lookup(args.lookup, args.draft)


if __name__ == "__main__":
    main()
