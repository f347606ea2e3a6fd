"""Does a checkpoint read an object's colour from the image? The simplest visual question, scored
without generation.

    python bench/color_readout.py --checkpoint assets/checkpoints/shapes-mmca [--scenes 60]

Takes the first ``--scenes`` test-split scenes with exactly one object (seed 1), asks "What color is
the <shape> in Image 1?" and takes the most likely of the six colour words as the first answer token.
It scores the true image and, as a control, another scene's image: a model that reads the image
beats the control; one that only learned the answer prior does not. Chance is 1/6.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402


@torch.no_grad()
def readout(vc, scenes, colors) -> dict:
    from visualchat_train.data.shapes import color_qa, draw
    from visualchat.template import Conversation, Round

    tok = vc.tokenizer
    first = [tok.encode(c, add_special_tokens=False)[0] for c in colors]
    feats = vc.model.encode_images([draw(s) for s in scenes]).to(vc.device)
    right = control = 0
    picked = collections.Counter()
    for i, s in enumerate(scenes):
        obj = s.objects[0]
        r = vc.template.render(Conversation([Round(images=["image"], question=color_qa(obj, 1)[0])]))
        ids = torch.tensor([r.input_ids], device=vc.device)
        is_img = torch.tensor([r.is_image], device=vc.device)
        for j, is_true in ((i, True), ((i + len(scenes) // 2) % len(scenes), False)):
            logits = vc.model(ids, is_img, feats[j][None], logits_to_keep=1).logits
            guess = colors[int(logits[0, -1, first].argmax())]
            if is_true:
                right += guess == obj.color
                picked[guess] += 1
            else:
                control += guess == obj.color
    n = len(scenes)
    return {"scenes": n, "accuracy": right / n, "control_accuracy": control / n, "answers": dict(picked)}


def one_object_scenes(n: int) -> list:
    """The first ``n`` test-split scenes (seed 1) with exactly one object."""
    from visualchat_train.data.shapes import random_scene

    rng = random.Random(1)
    scenes = []
    while len(scenes) < n:
        s = random_scene(rng, "test")
        if len(s.objects) == 1:
            scenes.append(s)
    return scenes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", nargs="+", default=["assets/checkpoints/shapes-mmca"])
    ap.add_argument("--scenes", type=int, default=60)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args(argv)

    from visualchat_train.data.shapes import COLORS
    from visualchat.model import VisualChat

    scenes = one_object_scenes(a.scenes)
    results = {}
    print("| checkpoint | colour accuracy | with another scene's image (control) | answers |\n|---|---|---|---|")
    for ck in a.checkpoint:
        vc = VisualChat.from_pretrained(ck, device="cpu")
        r = results[ck] = readout(vc, scenes, list(COLORS))
        print(f"| {ck} | {r['accuracy']:.1%} | {r['control_accuracy']:.1%} | {r['answers']} |", flush=True)
    write_json(a.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
