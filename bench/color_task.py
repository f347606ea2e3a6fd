"""The simplest visual task, to measure how fast a model learns to read images: one object on a
background, "What color is the <shape> in Image 1?", answer the colour.

    python bench/color_task.py make --out runs/color-task [--draws 1500]
    python bench/color_task.py probe --data runs/color-task/color.jsonl [--train 400] [--vision SPEC ...]

``make`` writes a ``jsonl`` data set (visualchat_train/data/jsonl.py's format, PNGs beside it) of one-object
scenes of the shapes world's train split (seed 5; a scene is kept only if it is itself a train-split
scene, so none is among the test scenes of bench/color_readout.py); train on it with
``python -m visualchat_train --dataset_names jsonl --data_path runs/color-task/color.jsonl ...`` and score with
bench/color_readout.py. ``probe`` is the yardstick: a logistic-regression probe on the mean of the
encoder's tokens, fitted on the first ``--train`` examples of that set and scored on
bench/color_readout.py's 60 test scenes, i.e. what a plain linear classifier learns from the same
examples and features, with no language model in the way.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402


def make(out: str, draws: int, seed: int = 5) -> int:
    """Write ``out``/color.jsonl and ``out``/images/; returns the number of conversations (a draw whose
    one-object scene is not a train-split scene is skipped)."""
    from visualchat_train.data.shapes import Scene, color_qa, draw, random_scene, split_of

    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    rng, n = random.Random(seed), 0
    with open(os.path.join(out, "color.jsonl"), "w") as f:
        for i in range(draws):
            s = random_scene(rng, "train")
            s = Scene(s.background, s.objects[:1], None)
            if split_of(s) != "train":
                continue
            path = f"images/{i}.png"
            draw(s).save(os.path.join(out, path))
            question, answer = color_qa(s.objects[0], 1)
            f.write(json.dumps({"rounds": [{"images": [path], "question": question, "answer": answer}]}) + "\n")
            n += 1
    return n


def probe(data: str, n_train: int, specs: list[str], n_test: int = 60) -> dict:
    """Per encoder spec: test accuracy of a colour probe on the mean token (see the module doc)."""
    from PIL import Image

    from bench.color_readout import one_object_scenes
    from bench.feature_probe import fit_probe
    from visualchat_train.data.shapes import COLORS, draw
    from visualchat.encoders import build_encoder

    base = os.path.dirname(os.path.abspath(data))
    with open(data) as f:
        recs = [json.loads(line)["rounds"][0] for line in f if line.strip()][:n_train]
    if len(recs) < n_train:
        raise SystemExit(f"{data} has only {len(recs)} examples (asked for --train {n_train})")
    test = one_object_scenes(n_test)
    images = [Image.open(os.path.join(base, r["images"][0])).convert("RGB") for r in recs] + [draw(s) for s in test]
    colors = list(COLORS)
    y = torch.tensor([colors.index(r["answer"]) for r in recs] + [colors.index(s.objects[0].color) for s in test])
    out = {}
    for spec in specs:
        enc = build_encoder(spec)
        with torch.no_grad():
            x = torch.cat([enc.encode(images[i:i + 64]).mean(1) for i in range(0, len(images), 64)])
        acc, _ = fit_probe(x[:, None, :].float(), y[:, None], n_train, len(colors))
        out[spec] = acc
        print(f"{spec}: colour probe on {n_train} examples -> {acc:.1%} on {n_test} test scenes", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write the data set")
    m.add_argument("--out", required=True)
    m.add_argument("--draws", type=int, default=1500, help="scenes drawn (those not in the train split are skipped)")
    p = sub.add_parser("probe", help="linear-probe yardstick on the same examples")
    p.add_argument("--data", required=True, help="color.jsonl written by make")
    p.add_argument("--train", type=int, default=400, help="examples the probe is fitted on")
    p.add_argument("--vision", nargs="+", default=["efficientnet-lite0", "efficientnet-lite0:stage4"])
    p.add_argument("--json", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)
    if a.cmd == "make":
        print(f"wrote {make(a.out, a.draws)} conversations to {os.path.join(a.out, 'color.jsonl')}")
    else:
        write_json(a.json, {"data": a.data, "train": a.train, "accuracy": probe(a.data, a.train, a.vision)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
