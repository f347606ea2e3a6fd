"""Tests of the shapes world's drawing styles: the plain drawing (today's, pixel for pixel) and the
varied one (seeded offsets, radii, backgrounds, noise, outlines, canvas sizes that keep the scene
graph true)."""
import hashlib
import random
from dataclasses import replace

import numpy as np
import PIL
import pytest

from visualchat_train.data import shapes as S

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


# -- varied samples -------------------------------------------------------------------------------

PINNED_TEST = "5af6bfb22506b864"  # tests/test_shapes.py's PINNED[1]: generate("test", 100) fingerprint


def _images(s):
    return list(s.conversation.images)


def test_varied_samples_ask_the_same_questions_about_the_same_scenes():
    assert S.SHAPES_VERSION == 1
    plain, varied = S.generate("test", 100), S.generate("test", 100, drawing="varied")
    assert S.fingerprint(plain) == S.fingerprint(varied) == PINNED_TEST
    assert S.fingerprint(S.generate("test", 100, drawing="plain")) == PINNED_TEST
    for p, v in zip(plain, varied):
        assert p.round_types == v.round_types and p.scenes == v.scenes
        assert [(r.question, r.answer) for r in p.conversation.rounds] == \
               [(r.question, r.answer) for r in v.conversation.rounds]
        assert all(im == S.LazyImage(im.scene) for im in _images(p))  # plain: exactly as before
        assert p.drawings == [None] * len(p.scenes)
        ims = _images(v)
        assert [im.drawing for im in ims] == v.drawings and all(d is not None for d in v.drawings)
        assert all(im.size == im.drawing.size for im in ims)
        assert len(set(v.drawings)) == len(v.drawings)  # each image its own drawing
    dense = S.generate("train", 20, style="dense")
    assert S.fingerprint(dense) == S.fingerprint(S.generate("train", 20, style="dense", drawing="varied"))
    with pytest.raises(ValueError, match="drawing"):
        S.make_sample("test", 0, drawing="fancy")


def test_varied_drawings_are_deterministic_per_split_seed_and_index():
    a = S.generate("validation", 8, seed=3, drawing="varied")
    assert S.make_sample("validation", 7, 3, drawing="varied").drawings == a[7].drawings
    assert [s.drawings for s in S.generate("validation", 8, seed=3, drawing="varied")] == [s.drawings for s in a]
    others = [S.make_sample("validation", 6, 3, drawing="varied"), S.make_sample("validation", 7, 4, drawing="varied"),
              S.make_sample("train", 7, 3, drawing="varied"), S.make_sample("validation", 7, 3, "dense", "varied")]
    assert all(o.drawings[0] != a[7].drawings[0] for o in others)
    x, y = a[7].materialize().images, S.make_sample("validation", 7, 3, drawing="varied").materialize().images
    assert all(np.array_equal(np.asarray(i), np.asarray(j)) for i, j in zip(x, y))
    plain = S.make_sample("validation", 7, 3).materialize().images
    assert all(i.size != j.size or not np.array_equal(np.asarray(i), np.asarray(j)) for i, j in zip(x, plain))


def test_feature_cache_keys_tell_the_drawings_apart():
    from visualchat_train.features import image_key

    p, v = S.make_sample("test", 2), S.make_sample("test", 2, drawing="varied")
    for a, b in zip(_images(p), _images(v)):
        assert a.scene == b.scene
        assert image_key(a) == f"shapes-v{S.SHAPES_VERSION}-{a.scene.id}-224"  # plain keys as before
        assert image_key(b) != image_key(a) and b.drawing.id in image_key(b)
        same_size = S.LazyImage(b.scene, b.size)  # even at the same size, the plain drawing is another image
        assert image_key(same_size) != image_key(b)


def test_save_jsonl_writes_varied_images_under_their_own_names(tmp_path):
    import json

    from PIL import Image

    plain, varied = S.generate("validation", 4), S.generate("validation", 4, drawing="varied")
    S.save_jsonl(plain + varied, str(tmp_path))
    recs = [json.loads(line) for line in open(tmp_path / "conversations.jsonl")]
    files = [[f for r in rec["rounds"] for f in r["images"]] for rec in recs]
    for fs, s in zip(files[:4], plain):
        assert fs == [f"images/{sc.id}.png" for sc in s.scenes]
    for fs, s in zip(files[4:], varied):
        assert len(fs) == len(s.scenes) and not set(fs) & {f for f2 in files[:4] for f in f2}
        for f, im in zip(fs, _images(s)):
            got = np.asarray(Image.open(tmp_path / f).convert("RGB"))
            assert got.shape == (im.size, im.size, 3) and np.array_equal(got, np.asarray(im.load()))


# -- training data --------------------------------------------------------------------------------

def test_shapes_varied_is_a_generated_data_set():
    from visualchat_train.data import load_dataset
    from visualchat_train.samples import DataStats, load_splits

    st = {}
    convs = load_dataset("shapes_varied", None, split="validation", n=5, seed=3, stats=st)
    assert st["loaded"] == 5
    ref = S.generate("validation", 5, 3)
    assert [[r.question for r in c.rounds] for c in convs] == [[r.question for r in s.conversation.rounds] for s in ref]
    assert all(im.drawing is not None and im.scene in s.scenes for c, s in zip(convs, ref) for im in c.images)
    # needs no --data_path, and brings its own validation split, like shapes
    train, val = load_splits(["shapes", "shapes_varied"], None, {"shapes": 6, "shapes_varied": 6}, 0.5, 0, 8, DataStats())
    assert len(train["shapes_varied"]) == 6 and len(val["shapes_varied"]) == 3
    assert all(im.drawing is None for c in train["shapes"] for im in c.images)
    assert all(im.drawing is not None for c in train["shapes_varied"] + val["shapes_varied"] for im in c.images)


# -- evaluation on scenes drawn differently --------------------------------------------------------

class _RecordingVC:
    """Answers every question right and records the images it was shown."""

    path = None

    def __init__(self, samples):
        self.script = [(r.question, r.answer) for s in samples for r in s.conversation.rounds]
        self.images = []

    def new_session(self, system=None):
        vc = self

        class Session:
            def ask(self, q, images, max_new_tokens):
                vc.images += list(images)
                question, answer = vc.script.pop(0)
                assert question == q
                return answer

        return Session()


def test_eval_scores_the_same_questions_drawn_varied():
    from visualchat_train.eval import score_shapes

    samples = S.generate("test", 4)
    runs = {}
    for drawing in ("plain", "varied"):
        vc = _RecordingVC(samples)
        res = score_shapes(vc, n=4, progress=False, drawing=drawing)
        assert res["drawing"] == drawing and res["accuracy"]["all"]["accuracy"] == 1.0
        runs[drawing] = (res, vc.images)
    (plain, p_ims), (varied, v_ims) = runs["plain"], runs["varied"]
    assert plain["accuracy"]["all"]["n"] == varied["accuracy"]["all"]["n"]
    assert [e["question"] for e in plain["examples"]] == [e["question"] for e in varied["examples"]]
    assert len(p_ims) == len(v_ims) and all(im.size == (224, 224) for im in p_ims)
    assert all(a.size != b.size or not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(p_ims, v_ims))


def test_eval_cli_drawing_varied_on_a_tiny_model(tiny_vc, tmp_path, monkeypatch):
    import json

    from visualchat_train import eval as E
    from visualchat.model import VisualChat

    monkeypatch.setattr(VisualChat, "from_pretrained", classmethod(lambda cls, *a, **k: tiny_vc))
    out = tmp_path / "varied.json"
    assert E.main(["--n", "2", "--drawing", "varied", "--max_new_tokens", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["drawing"] == "varied" and res["n_conversations"] == 2
    assert res["accuracy"]["all"]["n"] == sum(len(s.conversation.rounds) for s in S.generate("test", 2))
    with pytest.raises(SystemExit):
        E.main(["--n", "2", "--drawing", "fancy"])
