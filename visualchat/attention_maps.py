"""Where the model looked: per-image heat maps of the last answer's attention over the image tokens.

Computed on demand from one extra forward of the conversation up to the last answer, with the
attention probabilities captured in every layer (:data:`visualchat.attention.CAPTURE`); ordinary
answers never compute them. The queries are the positions that produced the answer's tokens (the
last prompt token, then every answer token but the final EOS), so each map shows the attention that
wrote the answer.

- **MMCA**: a text token's attention over the earlier image tokens is its own softmax (the image
  term of :func:`visualchat.attention.mmca_attention`), a distribution over all earlier image tokens.
- **CA**: the causal softmax over all earlier tokens; only its image columns are kept. The share
  of the attention that went to image tokens at all is reported beside it (:meth:`AttentionMaps.image_share`).

Both are averaged over heads and answer tokens, and over layers or one chosen layer. An image's map
is its part of that average, renormalised to sum to 1 over its own K tokens; its *share* is its part
of everything the answer paid to images. K tokens are laid out as a sqrt(K) x sqrt(K) grid in
row-major order (the encoders flatten their feature maps that way); a K that is not a square is laid
out as the most square h x w with h * w = K (:func:`grid_shape`), which says nothing reliable about
space, and :attr:`AttentionMaps.square` is then False.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import attention


def grid_shape(k: int) -> tuple[int, int]:
    """(rows, cols) for K image tokens: (s, s) when K = s * s, else the most square factorisation
    (rows <= cols; (1, K) for a prime K)."""
    if k < 1:
        raise ValueError(f"the number of image tokens must be >= 1, got {k}")
    s = math.isqrt(k)
    if s * s == k:
        return s, s
    rows = max(d for d in range(1, s + 1) if k % d == 0)
    return rows, k // rows


@dataclass
class AttentionMaps:
    """The captured attention of one answer. ``probs[l, i, t]``: the attention that the answer's
    tokens paid to token t of image i in layer l, averaged over heads and answer tokens (for CA a
    part of one softmax over all keys; for MMCA a part of the image-term softmax)."""

    mode: str  # "mmca" or "causal"
    probs: np.ndarray  # [layers, images, K]
    answer_tokens: int  # how many query positions were averaged

    @property
    def n_layers(self) -> int:
        return int(self.probs.shape[0])

    @property
    def n_images(self) -> int:
        return int(self.probs.shape[1])

    @property
    def image_tokens(self) -> int:
        return int(self.probs.shape[2])

    @property
    def grid(self) -> tuple[int, int]:
        return grid_shape(self.image_tokens)

    @property
    def square(self) -> bool:
        r, c = self.grid
        return r == c

    def _layer(self, layer: int | None) -> np.ndarray:
        """[images, K] for one layer (0-based) or the mean of all (None)."""
        if layer is None:
            return self.probs.mean(axis=0)
        if not 0 <= int(layer) < self.n_layers:
            raise ValueError(f"layer must be between 0 and {self.n_layers - 1} (or None for all), got {layer}")
        return self.probs[int(layer)]

    def maps(self, layer: int | None = None) -> list[np.ndarray]:
        """One ``[rows, cols]`` map per image, each summing to 1 (all zeros if the image got nothing)."""
        out = []
        for p in self._layer(layer):
            total = float(p.sum())
            out.append((p / total if total > 0 else p).reshape(self.grid))
        return out

    def shares(self, layer: int | None = None) -> np.ndarray:
        """Each image's share of the attention the answer paid to images (sums to 1)."""
        per_image = self._layer(layer).sum(axis=1)
        total = float(per_image.sum())
        return per_image / total if total > 0 else per_image

    def image_share(self, layer: int | None = None) -> float:
        """The share of all the answer's attention that went to image tokens. For CA this is a part of
        one softmax over text and image tokens; for MMCA the image term is a softmax of its own, so it
        is 1 whenever an image came before the answer."""
        return float(self._layer(layer).sum())

    def peak(self, image: int, layer: int | None = None) -> tuple[int, int]:
        """(row, col) of the map's largest cell for image ``image`` (0-based)."""
        m = self.maps(layer)[image]
        r, c = np.unravel_index(int(np.argmax(m)), m.shape)
        return int(r), int(c)


class _Recorder:
    """The capture callable: for the last ``n`` queries of every layer, the attention probabilities
    over the image keys, averaged over heads. Only this forward pays for them."""

    def __init__(self, n_queries: int):
        self.n = n_queries
        self.layers: list[torch.Tensor] = []

    def __call__(self, module, query, key, key_is_image, key_padding_mask, scale, mode, window):
        if query.shape[0] != 1:
            raise ValueError("attention maps are computed for one conversation at a time")
        n = min(self.n, query.shape[2])
        q = query[:, :, -n:].float()  # [1, Hq, n, D]
        k = key.float()
        if q.shape[1] != k.shape[1]:
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [1, H, n, Lk]
        masks = attention.build_masks(key_is_image, n, key_padding_mask, mode, window)
        allowed = masks[-1]  # MMCA: the image term; CA: the one causal softmax
        probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
        self.layers.append(probs[0][:, :, key_is_image[0].bool()].mean(dim=0).cpu())  # [n, image keys]


@torch.no_grad()
def compute(vc, rendered, image_rows: torch.Tensor | None) -> AttentionMaps:
    """The attention maps of the last answer of a rendered conversation (:class:`~visualchat.template.Rendered`
    whose last round is answered). ``image_rows``: the encoder features ``[n_images, K, d_vis]`` in
    conversation order. One forward of the model, without a KV cache (no session state changes)."""
    k = vc.config.image_tokens
    n_images = sum(rendered.is_image) // k
    if not n_images or image_rows is None:
        raise ValueError("this conversation has no images, so there is nothing to map")
    if not rendered.answer_starts:
        raise ValueError("there is no answer yet to map")
    start, eos = rendered.answer_starts[-1], vc.template.eos_id
    ids = rendered.input_ids
    try:
        end = ids.index(eos, start) + 1  # the answer's ids, its EOS included
    except ValueError:
        raise ValueError("the last round has no answer yet; ask something first") from None
    n_queries = end - start  # positions start-1 .. end-2 predicted the answer's tokens
    fed = end - 1
    dev = vc.device
    input_ids = torch.tensor([ids[:fed]], device=dev)
    is_img = torch.tensor([rendered.is_image[:fed]], device=dev)
    if int(is_img.sum()) != n_images * k:
        raise ValueError("the last round's answer comes before one of its images")  # cannot happen with the template
    recorder = _Recorder(n_queries)
    token = attention.CAPTURE.set(recorder)
    try:
        vc.model(input_ids, is_img, image_rows.reshape(-1, image_rows.shape[-1]).to(dev), logits_to_keep=1)
    finally:
        attention.CAPTURE.reset(token)
    if not recorder.layers:
        raise RuntimeError("no attention layer reported its probabilities: the LM does not run the visualchat "
                           "attention (attn_implementation)")
    per_layer = torch.stack([p.mean(dim=0) for p in recorder.layers])  # [layers, image keys]
    probs = per_layer.reshape(len(recorder.layers), n_images, k).numpy().astype(np.float64)
    return AttentionMaps(mode=vc.model.attention_mode, probs=probs, answer_tokens=n_queries)


# ---------------------------------------------------------------------------------------------------
# Drawing

#: dark purple -> red -> orange -> pale yellow (a perceptually ordered ramp, like "inferno")
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64)


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB floats in [0, 255], shape ``x.shape + (3,)``."""
    x = np.clip(np.asarray(x, dtype=np.float64), 0.0, 1.0) * (len(_RAMP) - 1)
    lo = np.floor(x).astype(int).clip(0, len(_RAMP) - 2)
    t = (x - lo)[..., None]
    return _RAMP[lo] * (1 - t) + _RAMP[lo + 1] * t


def hot_cells(heat: np.ndarray, share: float = 0.5) -> np.ndarray:
    """The fewest cells of ``heat`` (``[rows, cols]``, any non-negative scale) that hold at least ``share``
    of it, hottest first (at least one cell), as a boolean mask."""
    h = np.asarray(heat, dtype=np.float64)
    flat = h.ravel()
    order = np.argsort(-flat, kind="stable")
    total = flat.sum()
    n = 1 if total <= 0 else int(np.searchsorted(np.cumsum(flat[order]), share * total) + 1)
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order[:max(1, min(n, flat.size))]] = True
    return mask.reshape(h.shape)


def _outline(draw, mask: np.ndarray, size: tuple[int, int], width: int) -> None:
    """Draw the border of ``mask``'s cells (the cells tiling ``size``): a dark line with a light one inside,
    readable over any colour."""
    rows, cols = mask.shape
    xs = [round(j * size[0] / cols) for j in range(cols + 1)]
    ys = [round(i * size[1] / rows) for i in range(rows + 1)]
    edges = []
    for i in range(rows):
        for j in range(cols):
            if not mask[i, j]:
                continue
            if i == 0 or not mask[i - 1, j]:
                edges.append(((xs[j], ys[i]), (xs[j + 1], ys[i])))
            if i == rows - 1 or not mask[i + 1, j]:
                edges.append(((xs[j], ys[i + 1]), (xs[j + 1], ys[i + 1])))
            if j == 0 or not mask[i, j - 1]:
                edges.append(((xs[j], ys[i]), (xs[j], ys[i + 1])))
            if j == cols - 1 or not mask[i, j + 1]:
                edges.append(((xs[j + 1], ys[i]), (xs[j + 1], ys[i + 1])))
    clamp = lambda p: (min(max(p[0], 0), size[0] - 1), min(max(p[1], 0), size[1] - 1))  # noqa: E731
    for colour, w in (((0, 0, 0), width + 2), ((255, 255, 255), max(1, width - 1))):
        for a, b in edges:
            draw.line([clamp(a), clamp(b)], fill=colour, width=w)


def map_beside(image, heat: np.ndarray, share: float = 0.5, gap: int = 6):
    """The image in its own colours with the outline of its hot cells (the fewest cells holding ``share``
    of the attention: :func:`hot_cells`), and beside it the heat map itself, one block per token cell, the
    same outline on it (the encoder resizes the whole image to a square, so the cells tile the whole
    image). Nothing is drawn over the image but the outline."""
    from PIL import Image, ImageDraw

    im = image.convert("RGB")
    h = np.asarray(heat, dtype=np.float64)
    top = float(h.max())
    v = h / top if top > 0 else np.zeros_like(h)
    mask = hot_cells(h, share)
    width = max(2, round(max(im.size) / 150))
    cells = Image.fromarray(np.round(colormap(v)).astype(np.uint8)).resize(im.size, Image.NEAREST)
    out = Image.new("RGB", (2 * im.size[0] + gap, im.size[1]), (255, 255, 255))
    out.paste(im, (0, 0))
    _outline(ImageDraw.Draw(out), mask, im.size, width)  # the lines stay inside the image's part
    _outline(ImageDraw.Draw(cells), mask, im.size, width)
    out.paste(cells, (im.size[0] + gap, 0))
    return out
