"""Data efficiency, CA vs MMCA: six training runs of the embedded default (SmolLM2-135M + EfficientNet-Lite0)
on 10%, 30% and 100% of a shapes training set, all with the same steps, seed and hardware, each scored on
the shapes test split.

    python bench/data_efficiency.py --parallel                # the recorded study (2-core CPU, about 40 min)
    python bench/data_efficiency.py --full 120 --steps 10 --eval_n 4 --out runs/de-smoke   # a quick check

Every run is ``python -m visualchat_train --preset shapes-<attention> --dataset_names shapes`` (the shapes set
alone, without the recipes' text-only chat rounds) with ``--dataset_samples`` set to the budget
and ``--max_steps`` fixed, so a smaller budget means more passes over fewer conversations (the same
compute, less data). The validation split is the same 38 conversations for every run. Each run's
final checkpoint is scored with ``python -m visualchat_train.eval``. Runs that already have a score are skipped,
and a run whose ``final`` checkpoint exists and records the same training flags is only scored, so an
interrupted study resumes. ``--parallel`` trains the CA and MMCA run of a budget at the same time, one
thread each (on the 2-core machine that finished a pair in 10 min instead of 2 x 6.4 min). Writes into ``--out``: ``results.json``, ``table.md``,
``accuracy.png`` (accuracy against budget per question category) and ``val_loss.png`` (validation
loss curves of all six runs).

``--recipe`` runs the study with the shipped recipes themselves (issue 21's item 8): every run is
``python -m visualchat_train --preset shapes-<attention>`` with only ``--dataset_samples`` scaled (the recipe's shapes
conversations and text-only chat rounds, both to the budget, so the mix stays the recipe's), and the
recipe's own epochs, lr, schedule and validation share; a smaller budget is then less data and
proportionally less compute, which makes the three points a learning curve of the shipped recipe.
``--full_checkpoints`` scores the shipped pair as the 100% point instead of training it again:

    python bench/data_efficiency.py --recipe --parallel --budgets 10 30 100 --eval_n 100 \
        --full_checkpoints mmca=assets/checkpoints/shapes-mmca causal=assets/checkpoints/shapes-ca \
        --out runs/data-efficiency-recipe
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CATEGORIES = ("all", "single", "cross", "refer_back")
ATTENTIONS = {"mmca": "shapes-mmca", "causal": "shapes-ca"}
LABELS = {"mmca": "MMCA", "causal": "CA"}


def run_name(attention: str, pct: int) -> str:
    return f"{LABELS[attention].lower()}-{pct}pct"


def run(cmd: list[str], log_path: str) -> float:
    return run_all([(cmd, log_path)])[0]


def run_all(jobs: list[tuple[list[str], str]], env: dict | None = None) -> list[float]:
    """Run the commands at the same time (each logging to its file); wall seconds of each, from the
    common start to its own end."""
    t = time.time()
    procs = []
    for cmd, log_path in jobs:
        with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env))
    walls: list[float | None] = [None] * len(procs)
    while None in walls:
        for i, proc in enumerate(procs):
            if walls[i] is None and proc.poll() is not None:
                walls[i] = time.time() - t
        time.sleep(0.5)
    for proc, (cmd, log_path) in zip(procs, jobs):
        if proc.returncode:
            raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log_path}")
    return walls


def preset_lr() -> float:
    from visualchat_train.cli import load_recipe

    return float(load_recipe(ATTENTIONS["mmca"])["lr"])


def recipe_budget(pct: int) -> str:
    """``--dataset_samples`` of the shipped recipe scaled to ``pct`` percent: every data set of the recipe's
    ``name:count`` list (``all`` counted in the recipe's JSONL file) to the same share."""
    from visualchat_train.cli import load_recipe

    recipe = load_recipe(ATTENTIONS["mmca"])
    parts = []
    for item in str(recipe["dataset_samples"]).split(","):
        name, _, count = item.partition(":")
        if count == "all":
            if name != "jsonl":
                raise SystemExit(f"--recipe: cannot count {item!r} of the recipe's dataset_samples")
            with open(os.path.join(ROOT, recipe["data_path"])) as f:
                count = sum(1 for line in f if line.strip())
        parts.append(f"{name}:{max(1, round(int(count) * pct / 100))}")
    return ",".join(parts)


def checkpoint_info(ckpt: str) -> dict:
    """The ``info`` block of the checkpoint directory ``ckpt``'s config (empty when unreadable)."""
    try:
        with open(os.path.join(ckpt, "config.json")) as f:
            return json.load(f).get("info", {})
    except (OSError, ValueError):
        return {}


def trained_before(run_dir: str, cmd: list[str]) -> float | None:
    """Training wall seconds of a finished run in ``run_dir`` made with these flags (``--output_dir``
    aside), or None."""
    info = checkpoint_info(os.path.join(run_dir, "final"))
    if not info.get("command"):
        return None
    if _flags(info["command"].split()[1:]) != _flags(cmd):
        return None
    return float(info.get("wall_time_s", 0.0))


def _flags(cmd: list[str]) -> list:
    """Command tokens without --output_dir, numbers as floats (so 1e-2 == 0.01)."""
    out, skip = [], False
    for tok in cmd:
        if skip or tok == "--output_dir":
            skip = not skip
            continue
        try:
            out.append(float(tok))
        except ValueError:
            out.append(tok)
    return out


def val_curve(metrics_path: str) -> list[tuple[int, float]]:
    from visualchat_train.plots import read_metrics

    _, _, vs, vl = read_metrics(metrics_path)
    return list(zip(vs, vl))


def plots(results: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget_pct"] for r in results["runs"]})
    fig, axes = plt.subplots(1, len(CATEGORIES), figsize=(4 * len(CATEGORIES), 3.6), dpi=110, sharey=True)
    for ax, cat in zip(axes, CATEGORIES):
        for att, style in (("causal", "s--"), ("mmca", "o-")):
            pts = sorted((r["budget_pct"], 100 * r["accuracy"][cat]["accuracy"]) for r in results["runs"]
                         if r["attention"] == att and cat in r["accuracy"])
            if pts:
                ax.plot(*zip(*pts), style, label=LABELS[att])
        ax.set_title(cat)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [f"{b}%" for b in budgets])
        ax.set_xlabel(f"data budget (of {results['full']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("exact-match accuracy (%)")
    axes[0].legend()
    fig.suptitle("Shapes test accuracy vs data budget (" + (
        "the shipped recipe, one epoch each)" if results.get("recipe") else f"{results['steps']} steps each)"))
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    colors = {p: c for p, c in zip(budgets, ("tab:red", "tab:orange", "tab:blue"))}
    for r in results["runs"]:
        if not r["val_curve"]:  # a reused checkpoint without its training log
            continue
        steps, losses = zip(*r["val_curve"])
        ax.plot(steps, losses, "o-" if r["attention"] == "mmca" else "s--", ms=3, color=colors.get(r["budget_pct"]),
                label=f"{LABELS[r['attention']]} {r['budget_pct']}%")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (answer tokens)")
    ax.grid(alpha=0.3)
    ax.legend(ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_loss.png"))
    plt.close(fig)


def table(results: dict) -> str:
    lines = ["| attention | budget | conversations | " + " | ".join(CATEGORIES) + " | final val loss | train min |",
             "|---|---|---|" + "---|" * len(CATEGORIES) + "---|---|"]
    for r in sorted(results["runs"], key=lambda r: (r["budget_pct"], r["attention"])):
        acc = " | ".join(f"{100 * r['accuracy'][c]['accuracy']:.1f}% ({r['accuracy'][c]['n']})" if c in r["accuracy"]
                         else "-" for c in CATEGORIES)
        lines.append(f"| {LABELS[r['attention']]} | {r['budget_pct']}% | {r['conversations']} | {acc} | "
                     f"{r['val_curve'][-1][1] if r['val_curve'] else r.get('val_loss', float('nan')):.3f} | "
                     f"{r['train_s'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", type=int, default=400, help="conversations in the 100%% budget")
    ap.add_argument("--budgets", type=int, nargs="+", default=[100, 10, 30], help="budgets in %% of --full (run in this order)")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps of every run (4 conversations each)")
    ap.add_argument("--eval_every", type=int, default=20, help="validation loss every N steps")
    ap.add_argument("--val_n", type=int, default=38, help="validation conversations (the same for every run)")
    ap.add_argument("--eval_n", type=int, default=40, help="test conversations scored per run")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate of every run (default: the presets')")
    ap.add_argument("--parallel", action="store_true", help="train CA and MMCA of a budget at once, 1 thread each")
    ap.add_argument("--recipe", action="store_true", help="the shipped recipes with their data scaled to each budget (see above)")
    ap.add_argument("--full_checkpoints", nargs="+", default=[], metavar="ATTENTION=DIR",
                    help="--recipe: score these checkpoints as the 100%% budget instead of training it (mmca=DIR causal=DIR)")
    ap.add_argument("--out", default="runs/data-efficiency")
    args = ap.parse_args(argv)
    reuse = {}
    for item in args.full_checkpoints:
        att, _, ckpt = item.partition("=")
        if att not in ATTENTIONS or not os.path.isfile(os.path.join(ckpt, "config.json")):
            raise SystemExit(f"--full_checkpoints {item!r}: expected mmca=DIR or causal=DIR with DIR a checkpoint")
        if not args.recipe:
            raise SystemExit("--full_checkpoints needs --recipe (only the recipe's own checkpoints are its 100% point)")
        reuse[att] = ckpt
    os.makedirs(os.path.join(args.out, "runs"), exist_ok=True)
    path = os.path.join(args.out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    if args.recipe:
        args.full = recipe_budget(100)
    results.update(full=args.full, steps=args.steps, eval_n=args.eval_n, recipe=args.recipe, command=" ".join(["python", "bench/data_efficiency.py"] + (argv or sys.argv[1:])))
    done = {(r["attention"], r["budget_pct"]) for r in results.get("runs", [])}
    results.setdefault("runs", [])
    lr = args.lr if args.lr is not None else preset_lr()
    for pct in args.budgets:
        todo = [att for att in ATTENTIONS if (att, pct) not in done]
        n = recipe_budget(pct) if args.recipe else max(1, round(args.full * pct / 100))
        jobs = {}
        for att in todo:
            name = run_name(att, pct)
            run_dir = os.path.join(args.out, "runs", name)
            if args.recipe:
                cmd = ["-m", "visualchat_train", "--preset", ATTENTIONS[att], "--dataset_samples", n, "--eval_every",
                       str(args.eval_every), "--save_every", "0", "--resume", "none", "--no_progress", "--output_dir", run_dir]
                if pct == 100 and att in reuse:
                    run_dir = reuse[att]
                    cmd = None
                jobs[att] = (name, run_dir, cmd)
                continue
            cmd = ["-m", "visualchat_train", "--preset", ATTENTIONS[att], "--dataset_names", "shapes", "--dataset_samples", str(n),
                   "--val_ratio", f"{min(0.99, args.val_n / n):.6f}", "--max_steps", str(args.steps),
                   "--eval_every", str(args.eval_every), "--save_every", "0", "--resume", "none",
                   "--no_progress", "--lr", f"{lr:g}", "--output_dir", run_dir]
            jobs[att] = (name, run_dir, cmd)
        trained = {att: (float(checkpoint_info(run_dir).get("wall_time_s", 0.0)) if cmd is None
                         else trained_before(run_dir, cmd)) for att, (name, run_dir, cmd) in jobs.items()}
        to_train = [att for att in todo if trained[att] is None]
        for group in ([to_train] if args.parallel else [[att] for att in to_train]):
            if not group:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] train {', '.join(jobs[a][0] for a in group)}: {n} conversations, "
                  + ("the recipe's epochs" if args.recipe else f"{args.steps} steps, lr {lr:g}"), flush=True)
            env = dict(os.environ, OMP_NUM_THREADS="1") if len(group) > 1 else None
            walls = run_all([([sys.executable] + jobs[a][2], jobs[a][1] + ".train.log") for a in group], env)
            trained.update(zip(group, walls))
        for att in todo:
            name, run_dir, cmd = jobs[att]
            final = run_dir if cmd is None else os.path.join(run_dir, "final")
            out_dir = os.path.join(args.out, "runs", name) if cmd is None else run_dir
            os.makedirs(out_dir, exist_ok=True)
            eval_json = os.path.join(out_dir, "eval.json")
            print(f"[{time.strftime('%H:%M:%S')}] eval {name} ({trained[att] / 60:.1f} min training)", flush=True)
            run([sys.executable, "-m", "visualchat_train.eval", "--checkpoint", final,
                 "--n", str(args.eval_n), "--out", eval_json], out_dir + ".eval.log")
            with open(eval_json) as f:
                acc = json.load(f)["accuracy"]
            info = checkpoint_info(final)
            metrics = os.path.join(run_dir, "metrics.jsonl")
            results["runs"].append({"attention": att, "budget_pct": pct, "conversations": n, "train_s": trained[att],
                                    "train_command": info.get("command") if cmd is None else " ".join(cmd),
                                    "checkpoint": final, "lr": info.get("lr", lr), "accuracy": acc,
                                    "hardware": info.get("hardware"), "train_samples": info.get("train_samples"),
                                    "steps": info.get("steps"), "val_loss": info.get("val_loss"),
                                    "val_curve": val_curve(metrics) if os.path.exists(metrics) else []})
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
            plots(results, args.out)
            with open(os.path.join(args.out, "table.md"), "w") as f:
                f.write(table(results) + "\n")
    print(table(results))
    return results


if __name__ == "__main__":
    main()
