"""The training and validation loss curves of a run as a PNG (matplotlib, Agg backend)."""
from __future__ import annotations

import json


def read_metrics(path: str) -> tuple[list, list, list, list]:
    ts, tl, vs, vl = [], [], [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if "loss" in r:
                ts.append(r["step"])
                tl.append(r["loss"])
            if "val_loss" in r:
                vs.append(r["step"])
                vl.append(r["val_loss"])
    return ts, tl, vs, vl


def plot_losses(metrics_path: str, out_path: str, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts, tl, vs, vl = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if tl:
        ax.plot(ts, tl, color="tab:blue", alpha=0.3, lw=0.8, label="train (per step)")
        ema, smooth = None, []
        for x in tl:
            ema = x if ema is None else 0.9 * ema + 0.1 * x
            smooth.append(ema)
        ax.plot(ts, smooth, color="tab:blue", lw=1.6, label="train (EMA 0.9)")
    if vl:
        ax.plot(vs, vl, "o-", color="tab:orange", lw=1.6, ms=4, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (answer tokens)")
    ax.set_title(title or "VisualChat training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
