"""Does a trained MMCA model use its image term? Per layer, the norm of MMCA's image-term output against
its text-term output (mean over heads and the text queries that have an earlier image), in the prefill of
one test question with its image, through the reference attention (visualchat.attention.build_masks).

    python bench/mmca_image_term.py --checkpoint runs/words2-mmca/final [--checkpoint ...] [--sample 0]

A ratio near 0 means the model has learned to switch images off; near 1, the image mix is as large as
the text one. Results: bench/results/words-design.md.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def term_ratios(vc, question: str, images: list) -> tuple[str, list[float]]:
    """The answer (4 greedy tokens) and, per attention call of the prefill that had an image term, the
    mean of |image term| / |text term| over heads and the queries that have an earlier image."""
    import visualchat.attention as attention
    import visualchat.kernels as kernels
    from visualchat.attention_common import masked_sdpa

    ratios: list[float] = []

    def reference(query, key, value, key_is_image, key_padding_mask=None, scale=None, mode="mmca", window=None):
        masks = attention.build_masks(key_is_image, query.shape[2], key_padding_mask, mode, window)
        out = masked_sdpa(query, key, value, masks[0], scale)
        if len(masks) > 1 and masks[1].any():
            image = masked_sdpa(query, key, value, masks[1], scale)
            has = masks[1].any(-1)[:, None, :].expand(-1, out.shape[1], -1)  # [B, H, Lq]
            ratios.append(float((image.norm(dim=-1)[has] / out.norm(dim=-1)[has].clamp_min(1e-6)).mean()))
            out = out + image
        return out

    saved = kernels.attend, attention.reference_attention
    kernels.attend, attention.reference_attention = (lambda *a, **k: None), reference
    try:
        with torch.no_grad():
            answer = vc.new_session().ask(question, images=images, max_new_tokens=4)
    finally:
        kernels.attend, attention.reference_attention = saved
    return answer, ratios


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", action="append", required=True)
    p.add_argument("--sample", type=int, default=0, help="which shapes test conversation's first round")
    a = p.parse_args(argv)
    from visualchat.model import VisualChat
    from visualchat_train.data.shapes import generate

    first = generate("test", a.sample + 1, 0)[a.sample].materialize().rounds[0]
    for path in a.checkpoint:
        vc = VisualChat.from_pretrained(path, lm_weights="fp32")
        answer, ratios = term_ratios(vc, first.question, first.images)
        print(f"{path}: {first.question!r} -> {answer!r} (truth {first.answer!r}); |image term| / |text term| "
              f"per layer: {' '.join(f'{r:.2f}' for r in ratios)}")


if __name__ == "__main__":
    main()
