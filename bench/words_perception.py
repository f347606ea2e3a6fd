"""How well does a ``words`` checkpoint's perception read the test scenes, apart from the LM's reasoning?

    python bench/words_perception.py --checkpoint assets/checkpoints/shapes-mmca --n 100 [--out result.json]

The ``words`` projection (``visualchat.projection.Words``) classifies every cell of an image (size,
colour, shape, each with an "empty" class) and the written word; the LM then reads the predicted words.
This scores those heads alone against the scene graphs (``visualchat_train.data.shapes.concept_labels``) on the
images of the first ``n`` test conversations, drawn plainly (as the training generator does) and each
its own way (``--drawing varied``): accuracy per head over every cell, and the share of images whose
every cell and word are right (an image read perfectly, which the LM needs for "describe").

``--train_heads N --epochs E`` first trains the heads alone (``Words.aux_loss``, AdamW lr 1e-3) for E
passes over N fresh labelled images of the train split (half drawn plainly, half each its own way;
the encoder's features computed once), then scores: what heads trained to convergence would read,
with no LM in the loop. ``--vision SPEC`` (instead of ``--checkpoint``) builds fresh heads on that
encoder (one token per cell, e.g. ``efficientnet-lite0:stage4+head@3``) and trains them the same way:
which feature tap the heads should read.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import write_json  # noqa: E402


@torch.no_grad()
def perception(vc, n: int, drawing: str) -> dict:
    from visualchat_train.data.shapes import concept_labels, generate

    net = vc.model.projection.net
    images = {}
    for s in generate("test", n, 0, drawing=drawing):
        for r in s.conversation.rounds:
            for im in r.images:
                images.setdefault(im.file_name, im)
    ims = list(images.values())
    feats = torch.cat([vc.model.encode_images([im.load() for im in ims[i:i + 16]]) for i in range(0, len(ims), 16)])
    logits = net.logits(feats.to(vc.model.projection.first.weight.dtype))
    y = torch.tensor([concept_labels(im.scene) for im in ims])
    cells = feats.shape[1]
    heads = net.cell_heads
    cell_y = y[:, :cells * len(heads)].reshape(len(ims), cells, len(heads))
    ok = {h: logits[h].argmax(-1) == cell_y[..., i] for i, h in enumerate(heads)}
    out = {h: float(v.float().mean()) for h, v in ok.items()}
    for i, h in enumerate(net.image_heads):
        ok[h] = logits[h].argmax(-1) == y[:, cells * len(heads) + i]
        out[h] = float(ok[h].float().mean())
    whole = torch.stack([ok[h].all(-1) for h in heads] + [ok[h] for h in net.image_heads]).all(0)
    out["images"] = len(ims)
    out["image_read_perfectly"] = float(whole.float().mean())
    return out


def train_heads(vc, n: int, epochs: int, seed: int = 1) -> float:
    """Train the checkpoint's heads alone on ``n`` fresh train-split images; returns the last epoch's loss."""
    import random

    from visualchat_train.data.shapes import concept_labels, draw, random_drawing, random_scene

    rng = random.Random(seed)
    scenes = [random_scene(rng, "train") for _ in range(n)]
    drawings = [random_drawing(rng) if i % 2 else None for i in range(n)]
    with torch.no_grad():
        feats = torch.cat([vc.model.encode_images([draw(sc, None if d else 224, d) for sc, d in
                                                   zip(scenes[i:i + 32], drawings[i:i + 32])])
                           for i in range(0, n, 32)]).float()
    labels = torch.tensor([concept_labels(sc) for sc in scenes])
    net = vc.model.projection.net.float()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        total = 0.0
        for idx in torch.randperm(n, generator=gen).split(64):
            loss = net.aux_loss(feats[idx], labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
    return total / n


def fresh_heads(vision: str):
    """Untrained ``words`` heads on encoder ``vision``, shaped like a loaded VisualChat for :func:`perception`
    (no LM: the heads' word tables stay empty, only their classifiers are scored)."""
    from types import SimpleNamespace

    from visualchat.encoders import build_encoder
    from visualchat.projection import Projection
    from visualchat_train.data.shapes import CONCEPTS

    enc = build_encoder(vision).eval()
    torch.manual_seed(0)
    proj = Projection("words", enc.hidden_size, 8, enc.num_tokens, CONCEPTS)
    return SimpleNamespace(model=SimpleNamespace(projection=proj, encode_images=lambda ims: enc.encode(ims)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default="assets/checkpoints/shapes-mmca")
    ap.add_argument("--n", type=int, default=100, help="test conversations whose images are scored")
    ap.add_argument("--out", default=None)
    ap.add_argument("--train_heads", type=int, default=0, metavar="N",
                    help="first train the heads alone on N fresh labelled train-split images")
    ap.add_argument("--epochs", type=int, default=20, help="passes over them (with --train_heads)")
    ap.add_argument("--vision", default=None, help="fresh heads on this encoder instead of a checkpoint's "
                    "(needs --train_heads)")
    a = ap.parse_args(argv)
    from visualchat.model import VisualChat

    if a.vision:
        vc = fresh_heads(a.vision)
        a.checkpoint = None
    else:
        vc = VisualChat.from_pretrained(a.checkpoint, device="cpu", lm_weights="fp32")
    if vc.model.projection.kind != "words":
        raise SystemExit(f"{a.checkpoint}: the projection is {vc.model.projection.spec!r}; this scores a 'words' one")
    if a.vision and not a.train_heads:
        raise SystemExit("--vision builds untrained heads: give --train_heads N")
    result = {"checkpoint": a.checkpoint, "vision": a.vision, "n": a.n}
    if a.train_heads:
        result["train_heads"] = {"images": a.train_heads, "epochs": a.epochs,
                                 "last_epoch_loss": train_heads(vc, a.train_heads, a.epochs)}
        print(f"heads trained alone: {a.train_heads} images x {a.epochs} epochs, last loss "
              f"{result['train_heads']['last_epoch_loss']:.4f}")
    print("| drawing | images | " + " | ".join(vc.model.projection.net.labels()) + " | image read perfectly |")
    print("|---" * (3 + len(vc.model.projection.net.labels())) + "|")
    for drawing in ("plain", "varied"):
        r = perception(vc, a.n, drawing)
        result[drawing] = r
        heads = " | ".join(f"{100 * r[h]:.1f}%" for h in vc.model.projection.net.labels())
        print(f"| {drawing} | {r['images']} | {heads} | {100 * r['image_read_perfectly']:.1f}% |", flush=True)
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
