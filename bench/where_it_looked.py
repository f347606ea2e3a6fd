"""Does "Where it looked" point at the object? One-object shapes scenes (every cell of the 3 x 3 layout,
four shapes, large and small), the question "What color is the <shape> in Image 1?" answered with the
true colour (teacher-forced, so a wrong answer does not move the map), and the map of that answer
(``session.attention_maps()``). Counts, per checkpoint: the scenes whose map peak (mean of all layers)
lies in the object's cell, the same per layer, the scenes where the object's cell gets more than an
even share, and the mean share of the attention that went to image tokens at all.

    python bench/where_it_looked.py assets/checkpoints/shapes-mmca assets/checkpoints/shapes-ca
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = ("circle", "square", "triangle", "star")


def cell_of(peak, g: int) -> int:
    """The 3 x 3 layout cell that token cell ``peak`` of a g x g grid lies in."""
    return int((peak[0] + 0.5) * 3 / g) * 3 + int((peak[1] + 0.5) * 3 / g)


def measure(path: str) -> dict:
    from visualchat_train.data.shapes import COLORS, Obj, Scene, draw
    from visualchat import VisualChat

    vc = VisualChat.from_pretrained(path, device="cpu")
    colors = list(COLORS)
    hits, above, shares, layer_hits, n = 0, 0, [], None, 0
    for size in ("large", "small"):
        for cell in range(9):
            for j, shape in enumerate(SHAPES):
                color = colors[(cell + j) % len(colors)]
                scene = Scene(["white", "gray", "black"][(cell + 2 * j) % 3], (Obj(shape, color, size, cell),))
                s = vc.new_session()
                s.add_round(f"What color is the {shape} in Image 1?", [draw(scene)], color)
                m = s.attention_maps()
                g = m.grid[0]
                hits += cell_of(m.peak(0), g) == cell
                per_layer = np.array([cell_of(m.peak(0, layer), g) == cell for layer in range(m.n_layers)], dtype=int)
                layer_hits = per_layer if layer_hits is None else layer_hits + per_layer
                region = np.floor((np.arange(g) + 0.5) * 3 / g)
                mask = (region[:, None] == cell // 3) & (region[None, :] == cell % 3)
                above += float(m.maps()[0][mask].sum()) > float(mask.mean())
                shares.append(m.image_share())
                n += 1
    return {"checkpoint": path, "attention": vc.config.attention, "image_tokens": vc.config.image_tokens,
            "scenes": n, "peak_in_object_cell": hits, "peak_in_object_cell_per_layer": layer_hits.tolist(),
            "object_cell_above_even_share": above, "mean_image_share": float(np.mean(shares))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--out", default="bench/results/where_it_looked.json")
    args = p.parse_args(argv)
    results = []
    for path in args.checkpoints:
        t0 = time.time()
        r = measure(path)
        r["seconds"] = round(time.time() - t0, 1)
        results.append(r)
        print(f"{path} ({r['attention']}, K={r['image_tokens']}): peak in the object's cell {r['peak_in_object_cell']}"
              f"/{r['scenes']} (mean of layers); per layer {r['peak_in_object_cell_per_layer']}; object cell above an "
              f"even share {r['object_cell_above_even_share']}/{r['scenes']}; attention to image tokens at all "
              f"{r['mean_image_share']:.1%}", flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
