"""The text oracle: how well can the frozen LM answer the shapes questions when it is *told* what
every image shows, instead of seeing it?

Each image of a shapes conversation is replaced by a line of text naming its scene graph
("Image 1 shows: top left: a small red circle; center: a large blue star; the word cat"), put in
front of the question of the round that brings the image; everything else (rounds, refer-backs,
answers) stays. A model trained on these text-only conversations with the trainer (same recipe,
no images) and scored on the same test conversations gives an upper bound for what perfect
perception would buy, and so says whether the default's errors come from reading the image or
from the LM's reasoning.

    python bench/text_oracle.py make --n 2400 --out runs/oracle/oracle.jsonl
    python -m visualchat_train --preset shapes-mmca --dataset_names jsonl --data_path runs/oracle/oracle.jsonl \
        --dataset_samples all --max_steps 300 --output_dir runs/oracle-emb
    python bench/text_oracle.py eval --checkpoint runs/oracle-emb/final --n 100 --out oracle.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def scene_text(scene) -> str:
    """Everything a question can ask about one scene, as text."""
    parts = [f"{o.position}: a {o.size} {o.color} {o.shape}"
             for o in scene.objects]
    if scene.word:
        parts.append(f"the word {scene.word}")
    return "; ".join(parts) + f" (on {scene.background})"


def text_rounds(sample) -> list[dict]:
    """The sample's rounds with every image replaced by its scene text in front of the question."""
    rounds, k = [], 0
    for rnd, tag in zip(sample.conversation.rounds, sample.round_types):
        lines = []
        for im in rnd.images:
            k += 1
            lines.append(f"Image {k} shows: {scene_text(im.scene)}.")
        rounds.append({"question": "\n".join(lines + [rnd.question]), "answer": rnd.answer, "type": tag})
    return rounds


def make(n: int, out: str, seed: int = 0, dense: int = 0) -> int:
    from visualchat_train.data.shapes import generate

    samples = generate("train", n, seed) + (generate("train", dense, seed, style="dense") if dense else [])
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        for s in samples:
            f.write(json.dumps({"system": s.conversation.system, "rounds": text_rounds(s)}) + "\n")
    return len(samples)


def text_conversation(sample):
    """The sample as the conversation that is run: every image given as text, no image attached."""
    from visualchat.template import Conversation, Round

    return Conversation([Round(r["question"], [], r["answer"]) for r in text_rounds(sample)],
                        sample.conversation.system)


def score(vc, n: int, seed: int = 0, max_new_tokens: int = 32, progress: bool = True) -> dict:
    """Exact match of ``vc`` on the first ``n`` test conversations, told instead of shown
    (``visualchat_train.eval.score_shapes`` running :func:`text_conversation` of each sample)."""
    from visualchat_train.eval import score_shapes

    return score_shapes(vc, n, seed, max_new_tokens, progress, conversation_of=text_conversation)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="write text-only training conversations (train split)")
    m.add_argument("--n", type=int, default=2400)
    m.add_argument("--dense", type=int, default=0, help="extra dense-style conversations")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    e = sub.add_parser("eval", help="score a checkpoint on the test conversations, told instead of shown")
    e.add_argument("--checkpoint", default=None, help="default: the shipped MMCA model")
    e.add_argument("--n", type=int, default=100)
    e.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.cmd == "make":
        print(f"{make(a.n, a.out, a.seed, a.dense)} conversations -> {a.out}")
        return 0
    from visualchat_train.eval import print_table
    from visualchat.model import VisualChat

    vc = VisualChat.from_pretrained(a.checkpoint)
    t0 = time.time()
    result = score(vc, a.n)
    result["seconds"] = round(time.time() - t0, 1)
    print_table(result)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
