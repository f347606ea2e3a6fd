"""Tests of the shapes world's drawing styles: the plain drawing (today's, pixel for pixel) and the
varied one (seeded offsets, radii, backgrounds, noise, outlines, canvas sizes that keep the scene
graph true)."""
import hashlib
import random
from dataclasses import replace

import numpy as np
import PIL
import pytest

from train.data import shapes as S

# Hash of the plain drawing of the first 30 test conversations' scenes at 224 and 64 px, computed
# with the code as it was before drawing styles existed (Pillow's resampling may change the pixels
# between its versions, so the hash is pinned per Pillow version).
PLAIN_PIXELS = {"12.3.0": "cd87c7391eb30ae1"}


def _plain_hash(draw):
    h = hashlib.sha256()
    for s in S.generate("test", 30):
        for sc in s.scenes:
            for size in (224, 64):
                h.update(np.asarray(draw(sc, size)).tobytes())
    return h.hexdigest()[:16]


def test_plain_drawing_is_pixel_identical_to_before():
    if PIL.__version__ not in PLAIN_PIXELS:
        pytest.skip(f"no pinned plain-drawing hash for Pillow {PIL.__version__}")
    assert _plain_hash(S.draw) == PLAIN_PIXELS[PIL.__version__]
    assert _plain_hash(lambda sc, size: S.draw(sc, size, None)) == PLAIN_PIXELS[PIL.__version__]
    assert _plain_hash(lambda sc, size: S.LazyImage(sc, size).load()) == PLAIN_PIXELS[PIL.__version__]


def test_neutral_drawing_is_the_plain_drawing():
    for s in S.generate("test", 10):
        for sc in s.scenes:
            a = np.asarray(S.draw(sc))
            assert np.array_equal(a, np.asarray(S.draw(sc, drawing=S.Drawing())))
            assert np.array_equal(np.asarray(S.draw(sc, 100)), np.asarray(S.draw(sc, drawing=S.Drawing(size=100))))


def _drawings(n, seed=0):
    rng = random.Random(seed)
    return [S.random_drawing(rng) for _ in range(n)]


def test_random_drawings_are_deterministic_and_bounded():
    a, b = _drawings(50), _drawings(50)
    assert a == b and len(set(a)) == 50 and len({d.id for d in a}) == 50
    assert all(S.CANVAS[0] <= d.size <= S.CANVAS[1] for d in a)
    assert len({d.size for d in a}) > 20 and any(d.noise for d in a) and any(d.outline for d in a)
    assert any(not d.noise for d in a) and any(not d.outline for d in a)
    sc = S.make_sample("train", 4).scenes[0]
    for d in a[:4]:  # pixels too, noise included
        assert np.array_equal(np.asarray(S.draw(sc, drawing=d)), np.asarray(S.draw(sc, drawing=d)))
        assert S.draw(sc, drawing=d).size == (d.size, d.size)


def test_drawing_rejects_out_of_bounds_fields():
    for field, bad in [("small", 1.5), ("large", 0.5), ("noise", 50.0), ("outline", 0.2), ("shade", 99),
                       ("word_scale", 3.0), ("size", 4)]:
        with pytest.raises(ValueError, match=f"Drawing.{field}"):
            S.Drawing(**{field: bad})
    with pytest.raises(ValueError, match="Drawing.offsets"):
        S.Drawing(offsets=((0.0, 2.0),) * 9)


def _extreme_drawings():
    """The largest objects with the widest outline pushed to every corner of their cells, smallest canvas."""
    big = dict(size=S.CANVAS[0], small=S.SMALL_SCALE[1], large=S.LARGE_SCALE[1], outline=S.MAX_OUTLINE)
    return [S.Drawing(offsets=((dx, dy),) * 9, **big) for dx in (-1, 1) for dy in (-1, 1)]


def _ink(scene, drawing):
    """Where a scene's objects were drawn: pixels that differ from the same drawing of the empty scene."""
    full = np.asarray(S.draw(scene, drawing=drawing)).astype(int)
    empty = np.asarray(S.draw(replace(scene, objects=()), drawing=drawing)).astype(int)
    return np.abs(full - empty).max(axis=2) > 24


def test_a_lone_object_stays_inside_its_cell():
    drawings = _extreme_drawings() + [replace(d, size=S.CANVAS[0]) for d in _drawings(3, seed=1)]
    moved = 0
    for d in drawings:
        c = d.size / 3
        for cell in range(9):
            row, col = divmod(cell, 3)
            for shape in S.SHAPES:
                for size in S.SIZES:
                    bg = list(S.BACKGROUNDS)[(cell + len(shape)) % 3]
                    ink = _ink(S.Scene(bg, (S.Obj(shape, "red", size, cell),)), d)
                    ys, xs = np.nonzero(ink)
                    assert len(ys) > 20, (d, cell, shape, size)
                    inside = (xs >= col * c) & (xs < (col + 1) * c) & (ys >= row * c) & (ys < (row + 1) * c)
                    assert inside.all(), (d, cell, shape, size, xs.min(), xs.max(), ys.min(), ys.max())
                    cx, cy = (xs.mean() + 0.5) / c, (ys.mean() + 0.5) / c
                    moved += max(abs(cx - col - 0.5), abs(cy - row - 0.5)) > 0.05
    assert moved > 100  # and they do move away from the cell's centre


def test_small_stays_smaller_than_large():
    for d in _extreme_drawings()[:1] + [S.Drawing(small=S.SMALL_SCALE[1], large=S.LARGE_SCALE[0])] + _drawings(5, 2):
        for shape in S.SHAPES:
            area = {size: _ink(S.Scene("white", (S.Obj(shape, "blue", size, 4),)), d).sum() for size in S.SIZES}
            assert area["small"] < 0.85 * area["large"], (d, shape, area)


def test_varied_backgrounds_stay_near_their_colour():
    sc = S.Scene("gray", ())
    seen = set()
    for d in _drawings(20, 3):
        px = np.asarray(S.draw(sc, drawing=replace(d, noise=0.0))).reshape(-1, 3)
        assert (px == px[0]).all()  # flat, without noise
        seen.add(tuple(px[0]))
        assert np.abs(px[0].astype(int) - S.BACKGROUNDS["gray"]).max() <= S.MAX_SHADE + S.MAX_TINT
    assert len(seen) > 15
