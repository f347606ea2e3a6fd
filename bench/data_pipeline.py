"""Samples per second of the trainer's input pipeline alone (no model): open the JPEGs, preprocess them
to the encoder's square input, and collate micro-batches, in the training process (``--data_workers 0``)
or in DataLoader workers, exactly as ``python -m visualchat_train`` does (``visualchat_train.trainer.micro_batch_stream``).

    python bench/data_pipeline.py --workers 0,1,2 --image_size 448 --json bench/results/data-pipeline-cpu.json

The data: ``--images`` distinct COCO-sized JPEGs (640 x 480, smooth random colour fields, quality 90)
in a temporary folder and ``--samples`` conversations of 1-3 of them each (a ``jsonl`` file), turned into
training samples by ``visualchat_train.samples.build_samples`` with the tiny test tokenizer. Only preprocessing
matters here, so the encoder is the tiny random CLIP with its input size set to ``--image_size``
(224: CLIP ViT-L/14; 448: the Qwen-VL encoder of the paper). The figure to compare is the training
step's consumption: ``global batch / step time`` samples per second for the whole job, of which one
node's workers feed their share (``--consume`` prints the workers one node needs, if given).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import busy  # noqa: E402


def make_data(folder: str, n_images: int, n_samples: int, seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = []
    for i in range(n_images):
        small = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)  # upsampled: JPEG-like content
        im = Image.fromarray(small).resize((640, 480), Image.BICUBIC)
        name = f"img{i:04d}.jpg"
        im.save(os.path.join(folder, name), quality=90)
        names.append(name)
    r = random.Random(seed)
    path = os.path.join(folder, "bench.jsonl")
    with open(path, "w") as f:
        for i in range(n_samples):
            k = r.randint(1, 3)
            rounds = [{"images": [r.choice(names)], "question": f"What is in Image {j + 1}? ({i})",
                       "answer": "A field of colours."} for j in range(k)]
            f.write(json.dumps({"rounds": rounds}) + "\n")
    return path


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="0,1,2", help="data worker counts to measure, comma separated")
    p.add_argument("--prefetch_factor", type=int, default=2)
    p.add_argument("--images", type=int, default=64, help="distinct JPEG files")
    p.add_argument("--samples", type=int, default=256, help="conversations of 1-3 images")
    p.add_argument("--micro", type=int, default=4, help="samples per micro-batch")
    p.add_argument("--image_size", type=int, default=448, help="the encoder's square input (224 CLIP, 448 Qwen-VL)")
    p.add_argument("--consume", type=float, default=0.0, help="samples/s one node's GPUs consume (global batch / "
                   "step time / nodes): print the workers needed")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    import torch

    from visualchat_train.samples import build_samples
    from visualchat_train.tiny import build_tokenizer, resolve_vision_spec
    from visualchat_train.trainer import Batcher, micro_batch_stream
    from visualchat.encoders import build_encoder
    from visualchat.template import Template

    torch.set_num_threads(1)
    tok = build_tokenizer()
    enc = build_encoder(resolve_vision_spec("tiny"))
    enc.image_size = a.image_size  # preprocessing cost of a real encoder's input size
    with tempfile.TemporaryDirectory() as tmp:
        path = make_data(tmp, a.images, a.samples)
        train_s, _, _ = build_samples(["jsonl"], path, template=Template(tok, enc.num_tokens), val_ratio=0,
                                      concat="1", max_seq_len=4096)
        n_img = sum(len(s.images) for s in train_s)
        b = Batcher(train_s, a.micro, 1, 0, seed=0, features=None, encoder=enc)
        count = len(train_s) // a.micro
        rows = []
        for w in [int(x) for x in a.workers.split(",")]:
            t0 = time.perf_counter()
            it = micro_batch_stream(b, 0, count, workers=w, prefetch=a.prefetch_factor)
            first = next(it)
            t1 = time.perf_counter()
            n = 1
            for batch in it:
                n += 1
            t2 = time.perf_counter()
            assert n == count and first["pixel_values"].shape[-1] == a.image_size
            per_s = (n - 1) * a.micro / max(t2 - t1, 1e-9)
            rows.append({"workers": w, "samples_per_s": round(per_s, 1),
                         "images_per_s": round(per_s * n_img / len(train_s), 1),
                         "first_batch_s": round(t1 - t0, 2), "micro_batches": n})
            print(f"workers {w}: {per_s:7.1f} samples/s ({rows[-1]['images_per_s']:.1f} images/s), first micro-batch "
                  f"after {t1 - t0:.2f} s", flush=True)
    result = {"bench": "data_pipeline", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "busy_machine": busy(), "image_size": a.image_size, "micro": a.micro, "samples": len(train_s),
              "images_per_sample": round(n_img / len(train_s), 2), "prefetch_factor": a.prefetch_factor,
              "command": "python bench/data_pipeline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "rows": rows}
    if result["busy_machine"]:
        print("note: a training run was using the CPU while this ran (pgrep -f 'train --preset'): figures are low")
    if a.consume > 0:
        per_worker = max(r["samples_per_s"] / max(r["workers"], 1) for r in rows)
        print(f"one node consumes {a.consume:.1f} samples/s: about {a.consume / per_worker:.1f} workers at "
              f"{per_worker:.1f} samples/s each")
        result["consume"], result["workers_needed"] = a.consume, round(a.consume / per_worker, 2)
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
