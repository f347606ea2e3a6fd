"""Accuracy per question type against training conversations seen (log scale): what each level of
quality costs, and whether the targets are a matter of time or of design.

    python bench/learning_curve.py --run NAME=FINAL_DIR:SNAPSHOT_GLOB ... --n 100 \
        --out bench/results/learning-curve/curve.json --png bench/results/learning-curve/curve.png

Each ``--run`` names a run's exported ``final/`` checkpoint (whose config.json gives the encoder,
projection and attention) and a glob of its resumable snapshots (``checkpoints/step-N/state.pt``, or
copies of them named ``...step-N.pt``); every snapshot is turned into a checkpoint with the final
config and scored with ``visualchat_train.eval``'s ``score_shapes`` on the first ``--n`` test conversations.
``--points NAME=SAMPLES:EVAL_JSON`` adds already-scored checkpoints (e.g. the stage-1 checkpoint that
a second stage started from); a ``visualchat_train.eval`` JSON of more than ``--n`` conversations is re-scored on
its first ``--n`` from its answers. ``--series LABEL`` files this invocation's new points under a
series other than the run's own recipe (e.g. "continued: a second stage"): the plot draws the
recipe's points as lines per question type and every other series as markers of the overall figure. Conversations seen at step s = ``--offset`` (samples before this run,
read from the ``init_from`` checkpoint's config when given as ``--offset_from DIR``) + s x the run's
global batch. Snapshots are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402
from visualchat_train.eval import GOALS, prefix_accuracy  # noqa: E402

RECIPE = "recipe"  # the series of a run's own recipe (the default)
TYPES = ("all", "single", "cross", "refer_back", "single/color", "single/count", "single/where", "cross/more")


def step_of(path: str) -> int:
    m = re.search(r"step-(\d+)", path)
    if not m:
        raise ValueError(f"{path}: no step-N in the name")
    return int(m.group(1))


def snapshot_checkpoint(final_dir: str, state_path: str, out_dir: str) -> str:
    """A checkpoint directory from a snapshot's trainable tensors and the run's final config."""
    from visualchat import VisualChat
    from visualchat.config import VisualChatConfig

    if os.path.isdir(state_path):
        state_path = os.path.join(state_path, "state.pt")
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    trainable = state["trainable"]
    config = VisualChatConfig.load(final_dir)
    vc = VisualChat.from_pretrained(final_dir, device="cpu")
    with torch.no_grad():
        for name, p in vc.model.named_parameters():
            if name in trainable:
                p.copy_(trainable[name].to(p.dtype))
    config.info = {**config.info, "snapshot_of": state_path, "steps": step_of(state_path)}
    vc.config = config
    vc.save_pretrained(out_dir)
    return out_dir


def score(ckpt: str, n: int) -> dict:
    from visualchat_train.eval import score_shapes
    from visualchat import VisualChat

    vc = VisualChat.from_pretrained(ckpt, device="cpu")
    r = score_shapes(vc, n=n, progress=False)
    return {k: v for k, v in r["accuracy"].items()}


def projection(points: list[dict], run: str, goals: dict[str, float]) -> dict[str, dict]:
    """Per category of ``goals``: the least-squares line of accuracy against log10(conversations seen)
    through ``run``'s recipe points, and the conversations at which it would reach the goal (None when
    the line does not rise). An extrapolation, and says no more than its points do."""
    import math

    pts = [p for p in points if p["run"] == run and p.get("series", RECIPE) == RECIPE]
    out = {}
    for cat, goal in goals.items():
        xy = [(math.log10(p["samples"]), p["accuracy"][cat]["accuracy"]) for p in pts if cat in p["accuracy"]]
        if len(xy) < 2 or len({x for x, _ in xy}) < 2:
            continue
        mx, my = sum(x for x, _ in xy) / len(xy), sum(y for _, y in xy) / len(xy)
        slope = sum((x - mx) * (y - my) for x, y in xy) / sum((x - mx) ** 2 for x, _ in xy)
        at = None if slope <= 0 else 10 ** (mx + (goal - my) / slope)
        out[cat] = {"goal": goal, "points": len(xy), "per_decade": slope, "conversations_at_goal": at}
    return out


def plot(points: list[dict], png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted({p["run"] for p in points})
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.2), dpi=110, squeeze=False)
    for ax, run in zip(axes[0], runs):
        mine = sorted((p for p in points if p["run"] == run), key=lambda p: p["samples"])
        pts = [p for p in mine if p.get("series", RECIPE) == RECIPE]
        for t in TYPES:
            xs = [p["samples"] for p in pts if t in p["accuracy"]]
            ys = [100 * p["accuracy"][t]["accuracy"] for p in pts if t in p["accuracy"]]
            if xs:
                ax.plot(xs, ys, "o-", lw=2.2 if t == "all" else 1.1, ms=3.5, label=t,
                        color="black" if t == "all" else None)
        for series, marker in zip(sorted({p.get("series", RECIPE) for p in mine} - {RECIPE}), "D^vsP"):
            xs = [p["samples"] for p in mine if p.get("series") == series]
            ys = [100 * p["accuracy"]["all"]["accuracy"] for p in mine if p.get("series") == series]
            ax.plot(xs, ys, marker, ls="none", ms=7, mfc="none", mec="black", label=f"all, {series}")
        ax.axhline(95, color="tab:green", ls=":", lw=1)
        ax.axhline(80, color="tab:olive", ls=":", lw=1)
        ax.text(0.99, 95.5, "goal: single 95%", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7)
        ax.text(0.99, 80.5, "goal: cross, refer-back 80%", transform=ax.get_yaxis_transform(), ha="right", va="bottom",
                fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ticks = sorted({p["samples"] for p in (pts or mine)})
        ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
        ax.set_ylim(0, 100)
        ax.set_xlabel("training conversations seen (log scale)")
        ax.set_ylabel("exact match on the test set (%)")
        ax.set_title(run)
        ax.grid(alpha=0.3, which="both")
    axes[0][-1].legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], metavar="NAME=FINAL_DIR:SNAPSHOT_GLOB")
    ap.add_argument("--offset_from", action="append", default=[], metavar="NAME=CHECKPOINT_DIR",
                    help="the run started from this checkpoint: its config's steps x global batch come first")
    ap.add_argument("--points", action="append", default=[], metavar="NAME=SAMPLES:EVAL_JSON")
    ap.add_argument("--series", default=RECIPE, help="the series of this invocation's new points (default: the run's recipe)")
    ap.add_argument("--n", type=int, default=100, help="test conversations per point")
    ap.add_argument("--every", type=int, default=1, help="score every k-th snapshot")
    ap.add_argument("--out", required=True)
    ap.add_argument("--png", required=True)
    args = ap.parse_args(argv)

    points = json.load(open(args.out))["points"] if os.path.isfile(args.out) else []
    done = {(p["run"], p["samples"]) for p in points}
    offsets = {}
    for item in args.offset_from:
        name, d = item.split("=", 1)
        info = json.load(open(os.path.join(d, "config.json")))["info"]
        offsets[name] = int(info["steps"]) * int(info["global_batch"])
    for item in args.points:
        name, rest = item.split("=", 1)
        samples, path = rest.split(":", 1)
        if (name, int(samples)) not in done:
            points.append({"run": name, "samples": int(samples), "source": path, "series": args.series,
                           "accuracy": prefix_accuracy(json.load(open(path)), args.n)})
    for item in args.run:
        name, rest = item.split("=", 1)
        final, pattern = rest.split(":", 1)
        info = json.load(open(os.path.join(final, "config.json")))["info"]
        batch = int(info["global_batch"])
        snaps = sorted(glob.glob(pattern), key=step_of)[::args.every]
        targets = [(step_of(s), s) for s in snaps] + [(int(info["steps"]), final)]
        for step, src in targets:
            samples = offsets.get(name, 0) + step * batch
            if (name, samples) in done:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = src if src == final else snapshot_checkpoint(final, src, tmp)
                acc = score(ckpt, args.n)
            points.append({"run": name, "samples": samples, "step": step, "source": src, "series": args.series,
                           "accuracy": acc})
            done.add((name, samples))
            print(f"{name} step {step} ({samples} conversations): all {100 * acc['all']['accuracy']:.1f}%", flush=True)
            write_json(args.out, {"n_conversations": args.n, "points": points})
    proj = {run: projection(points, run, GOALS) for run in sorted({p["run"] for p in points})}
    for run, cats in proj.items():
        for cat, p in cats.items():
            at = p["conversations_at_goal"]
            print(f"{run} {cat}: {100 * p['per_decade']:+.1f} points per 10x conversations; goal {100 * p['goal']:.0f}% "
                  + ("never (the line does not rise)" if at is None else f"at about {at:,.0f} conversations"))
    write_json(args.out, {"n_conversations": args.n, "points": points, "projection": proj})
    plot(points, args.png)
    print(f"wrote {args.out} and {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
