"""How linearly readable are colour and shape from each EfficientNet-Lite0 feature tap?

    python bench/feature_probe.py [--scenes 2000] [--out bench/results/feature_probe.json]

Draws ``--scenes`` shapes scenes (train split, seed 0), encodes them once with every tap of
``visualchat.encoders.efficientnet.TAPS`` (the 14x14 stages pooled to 7x7, as the encoder does), and
fits one logistic-regression probe per tap and target on the token at the centre of each of the 3x3
scene cells: colour (6 colours or empty) and shape (4 shapes or empty). 80% of the scenes train the
probe, 20% score it; accuracy is reported over all cells and over the occupied ones.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402

CELL_TOKENS = [r * 7 + c for r in (1, 3, 5) for c in (1, 3, 5)]  # 7x7 token at each 3x3 cell's centre


def cell_labels(scene, colors, shapes):
    color, shape = [0] * 9, [0] * 9
    for o in scene.objects:
        color[o.cell], shape[o.cell] = 1 + colors.index(o.color), 1 + shapes.index(o.shape)
    return color, shape


def fit_probe(x, y, n_train, classes, steps=300):
    """Logistic regression on standardised features; returns (accuracy, accuracy where y > 0) on the rest."""
    mu, sd = x[:n_train].mean((0, 1)), x[:n_train].std((0, 1)) + 1e-4
    x = (x - mu) / sd
    w = torch.zeros(x.shape[-1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    xt, yt = x[:n_train].reshape(-1, x.shape[-1]), y[:n_train].reshape(-1)
    for _ in range(steps):
        loss = F.cross_entropy(xt @ w + b, yt) + 1e-4 * (w ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = (x[n_train:].reshape(-1, x.shape[-1]) @ w + b).argmax(-1)
    ys = y[n_train:].reshape(-1)
    return float((pred == ys).float().mean()), float((pred == ys)[ys > 0].float().mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenes", type=int, default=2000)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    from visualchat_train.data.shapes import COLORS, SHAPES, draw, random_scene
    from visualchat.encoders.efficientnet import TAPS, EfficientNetLite0

    taps = [t for t in TAPS if t != "pos"]
    enc = EfficientNetLite0(taps=tuple(taps))
    rng = random.Random(0)
    scenes = [random_scene(rng, "train") for _ in range(a.scenes)]
    t0 = time.time()
    feats = torch.cat([enc.encode([draw(s) for s in scenes[i:i + 32]]) for i in range(0, len(scenes), 32)])
    print(f"encoded {len(scenes)} scenes in {time.time() - t0:.0f} s", flush=True)
    labels = [cell_labels(s, list(COLORS), list(SHAPES)) for s in scenes]
    color = torch.tensor([c for c, _ in labels])
    shape = torch.tensor([s for _, s in labels])
    n_train = int(0.8 * len(scenes))
    rows, start = {}, 0
    print("| tap | width | colour (all cells) | colour (occupied) | shape (all) | shape (occupied) |\n|---|---|---|---|---|---|")
    for t in taps:
        width = TAPS[t][1]
        x = feats[:, CELL_TOKENS, start:start + width].float()
        start += width
        c_all, c_occ = fit_probe(x, color, n_train, len(COLORS) + 1)
        s_all, s_occ = fit_probe(x, shape, n_train, len(SHAPES) + 1)
        rows[t] = {"width": width, "color": c_all, "color_occupied": c_occ, "shape": s_all, "shape_occupied": s_occ}
        print(f"| {t} | {width} | {c_all:.1%} | {c_occ:.1%} | {s_all:.1%} | {s_occ:.1%} |", flush=True)
    write_json(a.out, {"scenes": len(scenes), "probe_train": n_train, "taps": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
