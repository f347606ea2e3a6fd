"""A grounded start for the projection: fit it by least squares so image tokens look like words.

With a frozen LM the projection starts from noise, and the first hundreds of steps go into making
image tokens harmless before they become informative. The shapes world knows what every image token
shows (its scene graph), so the projection can instead start where each token of an object's cell
lands near the LM's own embedding of that object's words (" red" and " circle"), a token over a
scene's written word near that word's embedding, and an empty token near the background's colour word.
The fit is ridge regression on the frozen encoder's (cached) features of the training scenes only:
closed form, a few seconds, deterministic. Training then goes on from there as usual.

Only shapes scenes carry the labels; samples of other data sets are ignored by the fit.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

log = logging.getLogger("visualchat_train.grounding")


def token_words(scene, grid: int = 7, size: int = 224) -> list[str]:
    """The words each of the ``grid`` x ``grid`` image tokens shows (row-major), from the scene graph:
    ``"red circle"`` over an object's cell, the written word over the middle row of a scene with a
    word, else the background's colour (``"white"``)."""
    by_cell = {o.cell: o for o in scene.objects}
    out = []
    for r in range(grid):
        for c in range(grid):
            y, x = (r + 0.5) * size / grid, (c + 0.5) * size / grid
            row, col = min(2, int(3 * y / size)), min(2, int(3 * x / size))
            cell = 3 * row + col
            if cell in by_cell:
                o = by_cell[cell]
                out.append(f"{o.color} {o.shape}")
            elif scene.word and row == 1:
                out.append(scene.word)
            else:
                out.append(scene.background)
    return out


def word_targets(texts: Sequence[str], tok, embedding: torch.Tensor) -> torch.Tensor:
    """``[len(texts), H]``: per text, the mean of the LM's input embeddings of its tokens (each text
    tokenised with a leading space, as the words appear mid-sentence), rescaled to the embedding's
    mean row norm so a target is as large as a real word's embedding."""
    scale = embedding.float().norm(dim=-1).mean()
    rows = []
    for t in texts:
        ids = tok(" " + t, add_special_tokens=False)["input_ids"]
        v = embedding[ids].float().mean(0)
        rows.append(v * scale / v.norm().clamp_min(1e-6))
    return torch.stack(rows)


def fit_projection(feats: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-2,
                   chunk: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression ``targets ~ feats @ W.T + b``: feats ``[n, D]``, targets ``[n, H]``.
    Returns (W ``[H, D]``, b ``[H]``). ``ridge`` is relative to the mean diagonal of the centred
    Gram matrix, so it does not depend on the features' scale. The sums are taken in float64,
    ``chunk`` rows at a time (no float64 copy of all features)."""
    mx, my = feats.mean(0, dtype=torch.float64), targets.mean(0, dtype=torch.float64)
    d, h = feats.shape[1], targets.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    xty = torch.zeros(d, h, dtype=torch.float64)
    for i in range(0, feats.shape[0], chunk):
        xc = feats[i:i + chunk].double() - mx
        gram += xc.T @ xc
        xty += xc.T @ (targets[i:i + chunk].double() - my)
    lam = ridge * gram.diagonal().mean()
    w = torch.linalg.solve(gram + lam * torch.eye(d, dtype=gram.dtype), xty).T  # [H, D]
    b = my - w @ mx
    return w.float(), b.float()


def ground_projection(vcm, tok, samples, cache=None, max_images: int = 4000, ridge: float = 1e-2) -> dict:
    """Set ``vcm.projection`` to the ridge fit on the shapes images of ``samples`` (training samples
    only; at most ``max_images`` distinct scenes, first come first served). Features come from the
    feature cache when there is one (filling in any it lacks), else from the encoder. Returns a summary (images, tokens, R^2 of
    the fit). Raises ValueError when the samples hold no shapes scenes or the encoder's grid is not
    square."""
    from .features import encode, image_key, is_lazy, open_ref

    if vcm.projection.kind != "linear":
        raise ValueError(f"--projection_init grounded fits a linear projection; --vis_proj is {vcm.projection.spec!r}")
    k = vcm.encoder.num_tokens
    grid = int(round(k ** 0.5))
    if grid * grid != k:
        raise ValueError(f"--projection_init grounded needs a square token grid, the encoder gives {k} tokens")
    refs, seen = [], set()
    for s in samples:
        for ref in s.images:
            if is_lazy(ref) and ref.scene.id not in seen:
                seen.add(ref.scene.id)
                refs.append(ref)
    refs = refs[:max_images]
    if not refs:
        raise ValueError("--projection_init grounded needs shapes scenes in the training data (it fits the "
                         "projection to their scene graphs); use --projection_init random for other data")
    base = vcm.base_embedding.detach().cpu()
    vocab: dict[str, int] = {}
    labels = []
    for ref in refs:
        for w in token_words(ref.scene, grid, ref.size):
            labels.append(vocab.setdefault(w, len(vocab)))
    table = word_targets(list(vocab), tok, base)  # [n_words, H]
    if cache is not None:  # the trainer has filled it already: then this only checks
        cache.fill(vcm.encoder, refs, progress=False)
        feats = [cache.get(image_key(ref)) for ref in refs]
    else:
        feats = [f for i in range(0, len(refs), 16) for f in encode(vcm.encoder, [open_ref(r) for r in refs[i:i + 16]])]
    x = torch.cat([f.reshape(-1, f.shape[-1]).float() for f in feats])  # [n*K, D]
    y = table[torch.tensor(labels)]
    w, b = fit_projection(x, y, ridge)
    with torch.no_grad():
        pred = x @ w.T + b
        r2 = 1 - ((pred - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum()
        nearest = (torch.nn.functional.normalize(pred, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T).argmax(-1)
        acc = (nearest == torch.tensor(labels)).float().mean()
        p = vcm.projection.net
        p.weight.copy_(w.to(p.weight.device, p.weight.dtype))
        p.bias.copy_(b.to(p.bias.device, p.bias.dtype))
    out = {"images": len(refs), "tokens": int(x.shape[0]), "words": len(vocab), "r2": round(float(r2), 4),
           "nearest_word_accuracy": round(float(acc), 4)}
    log.info("grounded projection: %s", out)
    return out
