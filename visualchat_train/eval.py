"""Evaluation runner: exact-match accuracy on the synthetic shapes test set, or answers for
conversation files in the reference format written to CSV.

    python -m visualchat_train.eval --checkpoint assets/checkpoints/shapes-mmca --n 200 --out eval.json
    python -m visualchat_train.eval --checkpoint assets/checkpoints/shapes-mmca --n 150 --drawing varied
    python -m visualchat_train.eval --checkpoint CKPT --conversations eval_single.json --image_root DIR --out answers.csv

Shapes scoring runs every conversation as a real chat (greedy, the model's own earlier answers stay in
the history) and compares each answer with the canonical one after normalising case, surrounding
space and a final full stop. It reports accuracy per fine type (``single/count`` ...), per category
(``single``, ``cross``, ``refer_back``) and overall, prints a table and writes JSON. ``--drawing
varied`` scores the same questions about the same scenes drawn another way (each image with its own
seeded offsets, radii, background, noise, outline and canvas size: ``visualchat_train.data.shapes.Drawing``), a
test of scenes drawn differently from the training generator's plain drawing.

Reference format: a JSON object whose keys name conversations, each a list of rounds ``[question]`` or
``[question, image_paths]``, where ``image_paths`` is one path or several separated by spaces (as the
original's batch_generation.py reads them; a field that names an existing file as a whole is one
path). Image paths starting with ``./eval/eval_data/images/`` are resolved against ``--image_root``. A conversation with a missing or bad image gets one CSV row with its error
and the runner goes on.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter, defaultdict

from tqdm import tqdm

REFERENCE_PREFIX = "./eval/eval_data/images/"


def normalise(text: str) -> str:
    return " ".join(text.strip().lower().rstrip(".").split())


def described_objects(text: str) -> Counter:
    """The (colour, shape) pairs a description names: "a red circle, a blue star and a red circle"
    -> {("red", "circle"): 2, ("blue", "star"): 1}. Words that are not a colour followed by a shape
    are ignored."""
    from visualchat_train.data.shapes import COLORS, SHAPES

    words = normalise(text).replace(",", " ").split()
    return Counter((a, b) for a, b in zip(words, words[1:]) if a in COLORS and b.rstrip("s") in SHAPES)


def object_f1(answer: str, expected: str) -> float:
    """F1 of the objects an answer names against the expected description (partial credit for
    "describe" questions, which exact match scores only when every object is right)."""
    got, want = described_objects(answer), described_objects(expected)
    hit = sum((got & want).values())
    if not hit:
        return 0.0
    p, r = hit / sum(got.values()), hit / sum(want.values())
    return 2 * p * r / (p + r)


def score_shapes(vc, n: int = 200, seed: int = 0, max_new_tokens: int = 32, progress: bool = True,
                 drawing: str = "plain", conversation_of=None) -> dict:
    """Exact-match accuracy of ``vc`` on the first ``n`` conversations of the shapes test split, drawn
    ``drawing`` ("plain" or "varied": the same questions and scenes either way). ``conversation_of``
    turns a test sample into the conversation that is run (default: ``sample.materialize()``, the
    images drawn; bench/text_oracle.py gives each image as text instead); its rounds keep the
    sample's order and answers."""
    from visualchat_train.data.shapes import SHAPES_VERSION, generate

    samples = generate("test", n, seed, drawing=drawing)
    examples, answers = [], []
    for sample in tqdm(samples, desc="eval", disable=not progress):
        conv = conversation_of(sample) if conversation_of else sample.materialize()
        session = vc.new_session(system=conv.system)
        for rnd, tag in zip(conv.rounds, sample.round_types):
            answer = session.ask(rnd.question, rnd.images, max_new_tokens=max_new_tokens)
            answers.append(answer)
            if len(examples) < 20:
                examples.append({"type": tag, "question": rnd.question, "expected": rnd.answer, "answer": answer})
    acc = tally(samples, answers)
    return {"shapes_version": SHAPES_VERSION, "n_conversations": n, "seed": seed, "drawing": drawing,
            "checkpoint": getattr(vc, "path", None), "lm_weights": getattr(vc, "lm_weights", "fp32"),
            "accuracy": acc, "examples": examples, "answers": answers}


def tally(samples, answers: list[str]) -> dict:
    """Exact-match accuracy (and object F1 of "describe" rounds) per question type, per category and
    overall, of ``answers`` (one per round, in the samples' order) on shapes ``samples``."""
    from visualchat_train.data.shapes import category

    rounds = [(rnd, tag) for s in samples for rnd, tag in zip(s.conversation.rounds, s.round_types)]
    if len(rounds) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(rounds)} rounds of {len(samples)} conversations")
    hits: dict[str, list[int]] = defaultdict(list)
    f1s: dict[str, list[float]] = defaultdict(list)
    for (rnd, tag), answer in zip(rounds, answers):
        ok = int(normalise(answer) == normalise(rnd.answer))
        for key in (tag, category(tag), "all"):
            hits[key].append(ok)
        if tag.endswith("/describe"):
            f1s[tag].append(object_f1(answer, rnd.answer))
    acc = {k: {"accuracy": sum(v) / len(v), "n": len(v)} for k, v in sorted(hits.items())}
    for k, v in f1s.items():
        acc[k]["object_f1"] = sum(v) / len(v)
    return acc


def prefix_accuracy(result: dict, n: int) -> dict:
    """The accuracy of a saved ``score_shapes`` result on its first ``n`` conversations, re-scored from its
    answers (the test split's first n conversations are a prefix of any longer run's)."""
    from visualchat_train.data.shapes import SHAPES_VERSION, generate

    have = result.get("n_conversations")
    if have == n:
        return result["accuracy"]
    if not have or have < n or not result.get("answers") or result.get("shapes_version") != SHAPES_VERSION:
        raise ValueError(f"the result scored {have} conversations (shapes version {result.get('shapes_version')}); "
                         f"a prefix of {n} needs at least that many, with answers, of version {SHAPES_VERSION}")
    samples = generate("test", n, result.get("seed", 0), drawing=result.get("drawing", "plain"))
    k = sum(len(s.round_types) for s in samples)
    return tally(samples, result["answers"][:k])


def answer_match(result: dict, other: dict) -> dict:
    """Share of rounds whose answer in ``result`` equals the one in ``other`` (same test set, same n)."""
    a, b = result.get("answers"), other.get("answers")
    if not a or not b or len(a) != len(b) or result.get("seed") != other.get("seed"):
        raise ValueError("the two results must come from the same test set and --n, both with their answers "
                         f"(rounds: {len(a or [])} and {len(b or [])}; seeds {result.get('seed')} and {other.get('seed')})")
    same = sum(x == y for x, y in zip(a, b))
    acc = lambda r: r["accuracy"]["all"]["accuracy"]  # noqa: E731
    return {"rounds": len(a), "same_answers": same, "match_rate": same / len(a),
            "accuracy_delta_points": round(100 * (acc(result) - acc(other)), 2),
            "other_lm_weights": other.get("lm_weights", "fp32")}


#: Issue 21's goal for the shipped default: exact match per category on the shapes test split.
GOALS = {"single": 0.95, "cross": 0.80, "refer_back": 0.80}


def print_table(result: dict, file=None) -> None:
    """The per-type table, with each category's goal (``GOALS``) and whether it is met."""
    file = file or sys.stdout
    print("| question type | accuracy | rounds | goal |\n|---|---|---|---|", file=file)
    for k, v in result["accuracy"].items():
        goal = GOALS.get(k)
        mark = "" if goal is None else f">= {100 * goal:.0f}%: " + (
            "met" if v["accuracy"] >= goal else f"short by {100 * (goal - v['accuracy']):.1f} points")
        print(f"| {k} | {100 * v['accuracy']:.1f}% | {v['n']} | {mark} |", file=file)
    for k, v in result["accuracy"].items():
        if "object_f1" in v:
            print(f"{k}: object F1 {100 * v['object_f1']:.1f}% (partial credit: the colour-shape pairs named)", file=file)


def eval_info(result: dict, command: str) -> dict:
    """What a checkpoint records of its shapes score (``config.json`` ``info.eval``; the web app's model
    line reads it): overall and per-category exact match, on which test set, by which command."""
    acc = result["accuracy"]
    return {"metric": "exact match", "task": "shapes", "shapes_version": result["shapes_version"],
            "drawing": result["drawing"], "conversations": result["n_conversations"], "seed": result["seed"],
            "rounds": acc["all"]["n"], "accuracy": round(acc["all"]["accuracy"], 4),
            "by_category": {k: round(v["accuracy"], 4) for k, v in acc.items() if k != "all" and "/" not in k},
            "lm_weights": result.get("lm_weights", "fp32"), "date": time.strftime("%Y-%m-%d"), "command": command}


def recorded_args(argv: list[str]) -> list[str]:
    """The arguments that made a score, for ``info.eval``'s command: without --write_info and where the
    JSON went (--out)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif a != "--write_info" and not a.startswith("--out="):
            out.append(a)
    return out


def write_eval_info(checkpoint: str, info: dict) -> None:
    """Record ``info`` as the checkpoint's ``info.eval`` in its config.json (the rest unchanged)."""
    from visualchat.config import VisualChatConfig

    cfg = VisualChatConfig.load(checkpoint)
    cfg.info = {**cfg.info, "eval": info}
    cfg.save(checkpoint)


def resolve(path: str, image_root: str) -> str:
    if path.startswith(REFERENCE_PREFIX):
        path = path[len(REFERENCE_PREFIX):]
    return path if os.path.isabs(path) else os.path.join(image_root, path)


def image_paths(field: str, image_root: str) -> list[str]:
    """The resolved image paths of a round's image field: several separated by spaces, or one whole
    path when the field names an existing file (a file name with a space in it)."""
    field = field.strip()
    if not field:
        return []
    whole = resolve(field, image_root)
    if os.path.isfile(whole):
        return [whole]
    return [resolve(p, image_root) for p in field.split()]


def run_conversations(vc, conversations: dict, image_root: str, out_csv: str, max_new_tokens: int = 128,
                      progress: bool = True) -> dict:
    """Answer every round of every conversation; write ``test_name,image_path,question,answer,error``
    rows. Returns counts of conversations done and failed."""
    from visualchat.images import ImageError, open_image

    done = failed = 0
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test_name", "image_path", "question", "answer", "error"])
        for name, rounds in tqdm(conversations.items(), desc="conversations", disable=not progress):
            try:  # open every image first: a missing one fails the conversation before any answer
                opened = [[open_image(p) for p in image_paths(r[1], image_root)] if len(r) > 1 and r[1] else []
                          for r in rounds]
            except ImageError as e:
                w.writerow([name, "", "", "", f"{type(e).__name__}: {e}"])
                failed += 1
                continue
            session = vc.new_session()
            try:
                for r, ims in zip(rounds, opened):
                    ans = session.ask(r[0], ims, max_new_tokens=max_new_tokens)
                    w.writerow([name, r[1] if len(r) > 1 else "", r[0], ans, ""])
                done += 1
            except (ValueError, RuntimeError) as e:  # e.g. too many images, context window
                w.writerow([name, "", "", "", f"{type(e).__name__}: {e}"])
                failed += 1
    return {"conversations": done, "failed": failed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m visualchat_train.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped MMCA model)")
    p.add_argument("--lm", default=None, help="override the base LM the checkpoint names")
    p.add_argument("--device", default=None)
    p.add_argument("--n", type=int, default=200, help="shapes test conversations to score")
    p.add_argument("--seed", type=int, default=0, help="shapes test split seed (0 = the versioned test set)")
    p.add_argument("--drawing", choices=("plain", "varied"), default="plain",
                   help="shapes: draw the test scenes as the generator does (plain) or each its own way "
                        "(varied: other positions in the cells, sizes, backgrounds, noise, image sizes)")
    p.add_argument("--conversations", default=None, help="reference-format JSON file (instead of shapes)")
    p.add_argument("--image_root", default=".", help="folder that reference image paths resolve against")
    p.add_argument("--max_new_tokens", type=int, default=None, help="default 32 for shapes, 128 otherwise")
    p.add_argument("--out", default=None, help="JSON (shapes) or CSV (conversations) output path")
    p.add_argument("--lm_weights", default=None,
                   help="the frozen LM's linear weights: fp32, fp16, bf16 or auto (CPU; visualchat.kernels.lowp); "
                        "default: the library's (auto: fp16 on a CPU that has it)")
    p.add_argument("--match", default=None, metavar="JSON",
                   help="a shapes result JSON of the same test set: report the share of rounds with the same "
                        "answer and the accuracy difference (e.g. fp16 weights against an fp32 run)")
    p.add_argument("--write_info", action="store_true",
                   help="shapes: also record the score in the checkpoint's config.json as info.eval (the web "
                        "app's model line shows it); needs --checkpoint")
    args = p.parse_args(argv)
    if args.write_info and (not args.checkpoint or args.conversations):
        p.error("--write_info records a shapes score in a checkpoint: give --checkpoint, and not --conversations")
    from visualchat.model import VisualChat

    kw = {"lm_weights": args.lm_weights} if args.lm_weights else {}
    vc = VisualChat.from_pretrained(args.checkpoint, lm=args.lm, device=args.device, **kw)
    t0 = time.time()
    if args.conversations:
        with open(args.conversations) as f:
            convs = json.load(f)
        out = args.out or os.path.splitext(os.path.basename(args.conversations))[0] + "_answers.csv"
        counts = run_conversations(vc, convs, args.image_root, out, args.max_new_tokens or 128)
        print(f"{counts['conversations']} conversations answered, {counts['failed']} failed -> {out}")
        return 0
    result = score_shapes(vc, args.n, args.seed, args.max_new_tokens or 32, drawing=args.drawing)
    result["seconds"] = round(time.time() - t0, 1)
    print_table(result)
    if args.match:
        with open(args.match) as f:
            result["match"] = answer_match(result, json.load(f))
        m = result["match"]
        print(f"same answer as {args.match} ({m['other_lm_weights']}): {m['same_answers']}/{m['rounds']} rounds "
              f"({100 * m['match_rate']:.1f}%), accuracy {m['accuracy_delta_points']:+.2f} points")
    out = args.out or "shapes_eval.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"-> {out}")
    if args.write_info:
        command = "python -m visualchat_train.eval " + " ".join(recorded_args(argv if argv is not None else sys.argv[1:]))
        write_eval_info(args.checkpoint, eval_info(result, command))
        print(f"-> {os.path.join(args.checkpoint, 'config.json')} (info.eval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
