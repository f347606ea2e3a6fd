"""Tests of the synthetic Shapes world: determinism, split hygiene, answer correctness, rendering."""
import json
import random
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from visualchat_train.data import shapes as S
from visualchat.template import Conversation, Round

# Fingerprint of generate("test", 100, seed=0) per version. If this fails, the generator changed:
# bump SHAPES_VERSION and add its fingerprint here (never edit an old entry).
PINNED = {1: "5af6bfb22506b864"}


@pytest.fixture(scope="module")
def train():
    return S.generate("train", 400, seed=0)


@pytest.fixture(scope="module")
def test_split():
    return S.generate("test", 300)


# -- determinism and versioning -------------------------------------------------------------------

def _text(samples):
    return [([(r.question, r.answer, [im.scene.key for im in r.images]) for r in s.conversation.rounds],
             s.round_types) for s in samples]


def test_deterministic_and_prefix_stable(train):
    assert _text(S.generate("train", 400, seed=0)) == _text(train)
    assert _text(S.generate("train", 50, seed=0)) == _text(train[:50])
    assert _text(S.generate("train", 50, seed=1)) != _text(train[:50])
    for s, again in zip(train[:5], S.generate("train", 5)):  # pixels too
        for a, b in zip(s.materialize().images, again.materialize().images):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_global_random_state_untouched():
    random.seed(123)
    state = random.getstate()
    a = _text(S.generate("validation", 30, seed=7))
    assert random.getstate() == state
    random.seed(999)
    assert _text(S.generate("validation", 30, seed=7)) == a


def test_test_split_is_pinned():
    assert S.SHAPES_VERSION in PINNED, "new SHAPES_VERSION: pin its test-split fingerprint"
    assert S.fingerprint(S.generate("test", 100)) == PINNED[S.SHAPES_VERSION]


def test_bad_split():
    with pytest.raises(ValueError):
        S.generate("dev", 1)


# -- splits ---------------------------------------------------------------------------------------

def test_splits_never_share_a_scene(train, test_split):
    val = S.generate("validation", 300)
    other_seed = S.generate("train", 200, seed=5)
    keys = {}
    for name, samples in [("train", train + other_seed), ("validation", val), ("test", test_split)]:
        keys[name] = {sc.key for s in samples for sc in s.scenes}
        assert all(S.split_of(sc) == name for s in samples for sc in s.scenes)
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


# -- structure ------------------------------------------------------------------------------------

def test_structure(train):
    seen_types, later_images = set(), 0
    for s in train:
        conv = s.conversation
        assert isinstance(conv, Conversation) and all(isinstance(r, Round) for r in conv.rounds)
        assert 1 <= len(conv.rounds) <= 4 and 1 <= len(s.scenes) <= 4
        assert len(s.round_types) == len(conv.rounds) and len(set(s.scenes)) == len(s.scenes)
        assert conv.rounds[0].images and [im.scene for im in conv.images] == s.scenes
        shown = 0
        for r, tag in zip(conv.rounds, s.round_types):
            assert tag in S.ROUND_TYPES
            first = shown + 1
            shown += len(r.images)
            later_images += bool(r.images) and first > 1 and r is not conv.rounds[0]
            refs = [int(n) for n in re.findall(r"Image (\d+)", r.question)]
            assert all(1 <= n <= shown for n in refs), (r.question, shown)
            cat = S.category(tag)
            if cat == "single":
                assert len(refs) == 1 and refs[0] >= first
            elif cat == "refer_back":
                assert len(refs) == 1 and refs[0] < first  # an earlier round's image, not re-shown
            else:
                assert shown >= 2 and (len(set(refs)) == 2 or "all the images" in r.question)
            assert len(r.answer.split()) <= 40 and len(r.question.split()) <= 12
            seen_types.add(tag)
    assert seen_types == set(S.ROUND_TYPES)
    assert later_images > 50  # images often arrive in later rounds


# -- answers, recomputed independently from the scene graphs -------------------------------------

def _objs(scene):
    return [(o.shape, o.color, o.size, S.POSITIONS[o.cell]) for o in scene.objects]


def _count(scene, what):
    return sum(what == "shape" or shp == what for shp, *_ in _objs(scene))


def _check(q, a, scenes, shown):
    if m := re.fullmatch(r"Describe Image (\d+)\.", q):
        objs = sorted(scenes[int(m[1]) - 1].objects, key=lambda o: o.cell)
        words = [f"{c} {shp}" for shp, c, *_ in [(o.shape, o.color) for o in objs]]
        assert re.sub(r"\ban? ", "", a).replace(" and ", ", ").split(", ") == words
    elif m := re.fullmatch(r"How many (\w+)s are in Image (\d+)\?", q):
        assert a == str(_count(scenes[int(m[2]) - 1], m[1]))
    elif m := re.fullmatch(r"What color is the (\w+) in Image (\d+)\?", q):
        hits = [c for shp, c, *_ in _objs(scenes[int(m[2]) - 1]) if shp == m[1]]
        assert hits == [a]
    elif m := re.fullmatch(r"Where is the (\w+) (\w+) in Image (\d+)\?", q):
        hits = [p for shp, c, _, p in _objs(scenes[int(m[3]) - 1]) if (c, shp) == (m[1], m[2])]
        assert hits == [a]
    elif m := re.fullmatch(r"What word is written in Image (\d+)\?", q):
        assert a == (scenes[int(m[1]) - 1].word or "none")
    elif m := re.fullmatch(r"Which image has more (\w+)s, Image (\d+) or Image (\d+)\?", q):
        ca, cb = _count(scenes[int(m[2]) - 1], m[1]), _count(scenes[int(m[3]) - 1], m[1])
        assert ca != cb and a == f"Image {m[2] if ca > cb else m[3]}"
    elif m := re.fullmatch(r"How many (\w+)s are there in all the images\?", q):
        assert a == str(sum(_count(scenes[k], m[1]) for k in range(shown)))
    elif m := re.fullmatch(r"What is different between Image (\d+) and Image (\d+)\?", q):
        x, y = scenes[int(m[1]) - 1], scenes[int(m[2]) - 1]
        assert (x.background, x.word) == (y.background, y.word)
        ox, oy = set(_objs(x)) - set(_objs(y)), set(_objs(y)) - set(_objs(x))
        assert len(ox) == len(oy) == 1
        (sx, cx, zx, px), (sy, cy, zy, py) = ox.pop(), oy.pop()
        i, j = m[1], m[2]
        expect = {
            "color": f"the {sx} is {cx} in Image {i} and {cy} in Image {j}",
            "size": f"the {cx} {sx} is {zx} in Image {i} and {zy} in Image {j}",
            "pos": f"the {cx} {sx} is at {px} in Image {i} and at {py} in Image {j}",
            "shape": f"the shape at {px} is a {sx} in Image {i} and a {sy} in Image {j}",
        }
        diff = [k for k, u, v in [("shape", sx, sy), ("color", cx, cy), ("size", zx, zy), ("pos", px, py)] if u != v]
        assert len(diff) == 1 and a == expect[diff[0]]
    else:
        raise AssertionError(f"unknown question form: {q!r}")


def test_answers_match_scene_graphs(train, test_split):
    for s in train + test_split:
        shown = 0
        for r in s.conversation.rounds:
            shown += len(r.images)
            _check(r.question, r.answer, s.scenes, shown)


# -- rendering ------------------------------------------------------------------------------------

def _cell_center(o, size=224):
    c = size / 3
    return int((o.cell % 3 + 0.5) * c), int((o.cell // 3 + 0.5) * c)


def test_draw_matches_scene(train):
    for s in train[:40]:
        for sc in s.scenes:
            im = np.asarray(S.draw(sc)).astype(int)
            assert im.shape == (224, 224, 3)
            for o in sc.objects:  # the centre of each object's cell has the object's colour
                x, y = _cell_center(o)
                assert np.abs(im[y, x] - S.COLORS[o.color]).max() <= 12, (sc.key, o)
            used = {o.cell for o in sc.objects} | ({3, 4, 5} if sc.word else set())
            for cell in set(range(9)) - used:  # empty cells are plain background
                r, c = divmod(cell, 3)
                block = im[r * 75 + 2:(r + 1) * 74 - 2, c * 75 + 2:(c + 1) * 74 - 2]
                assert np.abs(block - S.BACKGROUNDS[sc.background]).max() <= 2, (sc.key, cell)


def test_word_is_drawn_in_the_middle_row():
    rng = random.Random(0)
    scenes = [sc for sc in (S.random_scene(rng, "train") for _ in range(300)) if sc.word][:10]
    assert scenes
    for sc in scenes:
        a = np.asarray(S.draw(sc)).astype(int)
        b = np.asarray(S.draw(replace(sc, word=None))).astype(int)
        band = np.abs(a - b)[75:149].max(axis=2)
        assert (band > 100).sum() > 500  # plenty of ink
        assert np.array_equal(a[:70], b[:70]) and np.array_equal(a[154:], b[154:])
        other = replace(sc, word=next(w for w in S.WORDS if w != sc.word))
        assert not np.array_equal(a, np.asarray(S.draw(other)))


def test_different_scenes_render_differently(train):
    pairs = 0
    for s in train:
        for i in range(len(s.scenes)):
            for j in range(i + 1, len(s.scenes)):
                if pairs < 30 and S.difference(s.scenes[i], s.scenes[j], i + 1, j + 1):
                    pairs += 1
                    a, b = (np.asarray(S.draw(s.scenes[k])) for k in (i, j))
                    assert np.abs(a.astype(int) - b).max() > 100
    assert pairs == 30


def test_lazy_images():
    s = S.make_sample("train", 3)
    im = s.conversation.rounds[0].images[0]
    assert isinstance(im, S.LazyImage)
    assert isinstance(im.load(), Image.Image) and im.load().size == (224, 224)
    assert S.LazyImage(im.scene, 112).load().size == (112, 112)
    assert all(isinstance(x, Image.Image) for x in s.materialize().images)


# -- files ----------------------------------------------------------------------------------------

def test_save_jsonl(tmp_path):
    samples = S.generate("validation", 6)
    path = S.save_jsonl(samples, str(tmp_path))
    lines = open(path).read().splitlines()
    assert len(lines) == 6
    for line, s in zip(lines, samples):
        rec = json.loads(line)
        assert rec["system"] == s.conversation.system
        assert [r["type"] for r in rec["rounds"]] == s.round_types
        assert [(r["question"], r["answer"]) for r in rec["rounds"]] == \
               [(r.question, r.answer) for r in s.conversation.rounds]
        files = [f for r in rec["rounds"] for f in r["images"]]
        assert len(files) == len(s.scenes)
        for f, sc in zip(files, s.scenes):
            assert not f.startswith("/")
            assert np.array_equal(np.asarray(Image.open(tmp_path / f).convert("RGB")), np.asarray(S.draw(sc)))


# -- the dense style ------------------------------------------------------------------------------

def test_dense_style():
    dense = S.generate("train", 200, style="dense")
    assert _text(S.generate("train", 20, style="dense")) == _text(dense[:20])
    assert S.fingerprint(S.generate("test", 100)) == PINNED[S.SHAPES_VERSION]  # the default is untouched
    assert {sc.key for s in dense for sc in s.scenes} != {sc.key for s in S.generate("train", 200) for sc in s.scenes}
    for s in dense:
        assert 5 <= len(s.conversation.rounds) <= 8 and 1 <= len(s.scenes) <= 3
        assert all(S.split_of(sc) == "train" for sc in s.scenes)
        shown = []
        for r in s.conversation.rounds:
            shown += [im.scene for im in r.images]
            _check(r.question, r.answer, s.scenes, len(shown))
    mixed = S.generate("train", 200)
    per_conv = lambda ss: sum(len(s.conversation.rounds) for s in ss) / sum(len(s.scenes) for s in ss)
    assert per_conv(dense) > 2.5 * per_conv(mixed)  # many more questions per image
    with pytest.raises(ValueError, match="style"):
        S.make_sample("train", 0, style="sparse")


def test_dense_is_a_data_set():
    from visualchat_train.data import load_dataset

    st = {}
    convs = load_dataset("shapes_dense", None, split="validation", n=12, seed=3, stats=st)
    assert st["loaded"] == 12 and all(len(c.rounds) >= 5 for c in convs)
    assert [r.question for r in convs[0].rounds] == [r.question for r in S.generate("validation", 1, 3, "dense")[0].conversation.rounds]


def test_all_questions_are_right_and_complete(train):
    for s in train[:60]:
        qs = S.all_questions(s.scenes)
        for tag, q, a in qs:
            assert tag in S.ROUND_TYPES
            _check(q, a, s.scenes, len(s.scenes))
        if len(s.conversation.rounds[0].images) == len(s.scenes):  # all shown at once, as all_questions assumes
            asked = {(r.question, r.answer) for r in s.conversation.rounds}
            assert asked <= {(q, a) for _, q, a in qs}  # whatever the generator asks is among them
    ex = S.example_samples()
    assert [len(e.scenes) for e in ex] == [1, 2, 2]
