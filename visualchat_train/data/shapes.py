"""Shapes: a seeded, synthetic multi-image world for training and testing multi-image visual chat.

World
-----
A scene is a 3x3 grid on a plain background (white, gray or black) holding 1-6 objects, at most one
per cell. An object is a shape (circle, square, triangle, star) in one of six colours (red, green,
blue, yellow, purple, orange), small or large. Cells are named row then column: "top left",
"top center", "top right", "center left", "center", "center right", "bottom left", "bottom center",
"bottom right". About a quarter of the scenes also show one short word (from ``WORDS``) written large
across the middle row; such scenes keep their objects in the top and bottom rows. A :class:`Scene`
is a frozen, hashable dataclass; ``draw(scene, size=224)`` renders it deterministically (drawn at
2x, then downsampled, with Pillow's scalable default font).

Drawings
--------
The plain drawing (``draw(scene)``, ``drawing=None``; every split's default and the versioned test
set's) puts each object at the centre of its cell with one of two fixed radii on a flat background,
224 px. A :class:`Drawing` varies that without changing what the scene graph says:
``random_drawing(rng)`` moves each object inside its cell (never out of it, ``MARGIN`` from its
border), scales the radii (``SMALL_SCALE``, ``LARGE_SCALE``: any small object stays smaller than
any large one), shades and tints the background (+-``MAX_SHADE``, +-``MAX_TINT`` per channel),
half the time adds light Gaussian noise (std <= ``MAX_NOISE``) and half the time an outline in the
word's ink colour, sizes the word (``WORD_SCALE``) and picks the canvas size (``CANVAS``, 160-384 px;
the encoder resizes). ``draw(scene, size, drawing)``; ``Drawing()`` draws exactly as the plain drawing.

Conversations
-------------
``generate(split, n, seed)`` returns ``n`` :class:`ShapesSample` objects. Each holds a
``visualchat.template.Conversation`` of 1-4 rounds showing 1-4 images in all (numbered from 1 across
the conversation; round 1 brings at least one image, later rounds may bring more), a parallel list
``round_types`` of tags ``"<category>/<type>"``, and the scene of every image. Images in the rounds
are :class:`LazyImage` objects: they keep the scene and render only on ``.load()``, so generating
50k conversations costs no drawing. ``sample.materialize()`` gives the conversation with PIL images.
``generate(..., style="dense")`` draws 5-8 rounds about 1-3 images instead (most questions then
refer back): about 2.5 times as many answers per training token, from its own random streams.
``generate(..., drawing="varied")`` asks the same questions about the same scenes (the fingerprint
is the plain one's) and draws each image with its own :class:`Drawing`, from a random stream of its
own keyed by ``(SHAPES_VERSION, style, split, seed, index)``; ``LazyImage.drawing`` keeps it
(``None``: plain), and the feature cache's image key includes its id.

Question types (answers are short and canonical, so they can be scored by exact match):

  single/describe   Describe Image 1.                         a red circle and a blue square
  single/count      How many shapes are in Image 2?           3      (or "How many stars ...", may be 0)
  single/color      What color is the star in Image 1?        red    (asked only of a unique shape)
  single/where      Where is the red circle in Image 1?       top left
  single/word       What word is written in Image 1?          cat    ("none" when there is no word)
  cross/more        Which image has more circles, Image 1 or Image 2?      Image 2
  cross/diff        What is different between Image 1 and Image 3?
                    the circle is red in Image 1 and blue in Image 3   (pairs differing in exactly one
                    object attribute: colour, size, position or shape)
  cross/total       How many circles are there in all the images?       5   (all images shown so far)
  refer_back/<t>    any single type, asked of an image shown in an earlier round, not re-shown.

"single" asks about an image brought by the current round. Descriptions list objects in reading
order (top left to bottom right), colour and shape only.

Splits and versioning
---------------------
Every scene belongs to exactly one split, fixed by a hash of its scene graph (``split_of``: 10% test,
10% validation, 80% train); each split draws scenes by rejection until they fall in its bucket, so
no scene is ever shared between splits, whatever the seeds. Sample ``i`` of ``(split, seed)`` depends
only on ``(SHAPES_VERSION, split, seed, i)`` through its own ``random.Random`` (the global random
state is never touched), so ``generate(s, 10)`` is a prefix of ``generate(s, 1000)``. The test split
is ``generate("test", n, seed=0)``; any change to the generator that changes its output must bump
``SHAPES_VERSION`` (tests pin a fingerprint of the test split per version).

Files: ``save_jsonl(samples, out_dir)`` writes ``out_dir/images/<scene id>.png`` (a varied image:
``<scene id>-<drawing id>-<px>.png``) and
``out_dir/conversations.jsonl``, one conversation a line:
``{"system": ..., "rounds": [{"images": ["images/....png"], "question": ..., "answer": ..., "type": ...}]}``.
CLI: ``python -m visualchat_train.data.shapes --split test --n 500 --out data/shapes_test [--drawing varied]``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from visualchat.template import DEFAULT_SYSTEM, Conversation, Round

SHAPES_VERSION = 1
SPLITS = ("train", "validation", "test")

SHAPES = ("circle", "square", "triangle", "star")
COLORS = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 80, 230),
    "yellow": (245, 205, 0), "purple": (140, 50, 190), "orange": (245, 130, 0),
}
BACKGROUNDS = {"white": (255, 255, 255), "gray": (175, 175, 175), "black": (20, 20, 20)}
INK = {"white": (0, 0, 0), "gray": (0, 0, 0), "black": (255, 255, 255)}  # colour of the word
SIZES = ("small", "large")
RADIUS = {"small": 0.22, "large": 0.40}  # object radius, as a fraction of a cell's side
_ROWS, _COLS = ("top", "center", "bottom"), ("left", "center", "right")
POSITIONS = tuple("center" if r == c == "center" else f"{r} {c}" for r in _ROWS for c in _COLS)
WORDS = ("cat", "dog", "sun", "car", "hat", "fish", "tree", "book", "bird", "cake")
WORD_CELLS = (0, 1, 2, 6, 7, 8)  # a scene with a word keeps the middle row for it
MAX_OBJECTS = 6
P_WORD = 0.25      # chance that a scene shows a word
P_VARIANT = 0.4    # chance that a later image is a one-attribute variant of an earlier one


# -----------------------------------------------------------------------------------------------
# scene graphs

@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str
    cell: int  # 0..8 in reading order; POSITIONS[cell] is its name

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]  # kept sorted by cell
    word: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=lambda o: o.cell)))

    @property
    def key(self) -> str:
        """Canonical text of the scene graph; equal scenes have equal keys."""
        objs = ";".join(f"{o.cell}:{o.size}:{o.color}:{o.shape}" for o in self.objects)
        return f"{self.background}|{self.word or '-'}|{objs}"

    @property
    def id(self) -> str:
        return hashlib.sha256(self.key.encode()).hexdigest()[:12]

    def count(self, shape: str | None = None) -> int:
        """Objects of ``shape`` (all objects when None)."""
        return sum(shape is None or o.shape == shape for o in self.objects)

    def to_dict(self) -> dict:
        return {"background": self.background, "word": self.word,
                "objects": [[o.shape, o.color, o.size, o.position] for o in self.objects]}


def split_of(scene: Scene) -> str:
    """The one split a scene may appear in, fixed by a hash of its graph."""
    h = int(hashlib.sha256(scene.key.encode()).hexdigest()[:8], 16) % 10
    return "test" if h == 0 else "validation" if h == 1 else "train"


def random_scene(rng: random.Random, split: str) -> Scene:
    while True:
        word = rng.choice(WORDS) if rng.random() < P_WORD else None
        cells = rng.sample(WORD_CELLS if word else range(9), rng.randint(1, MAX_OBJECTS))
        objs = [Obj(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(SIZES), c) for c in cells]
        scene = Scene(rng.choice(list(BACKGROUNDS)), tuple(objs), word)
        if split_of(scene) == split:
            return scene


def vary(rng: random.Random, scene: Scene, split: str) -> Scene | None:
    """A scene of ``split`` differing from ``scene`` in exactly one nameable object attribute."""
    for _ in range(60):
        objs = list(scene.objects)
        k = rng.randrange(len(objs))
        o, attr = objs[k], rng.choice(("color", "size", "position", "shape"))
        if attr == "color":
            objs[k] = replace(o, color=rng.choice([c for c in COLORS if c != o.color]))
        elif attr == "size":
            objs[k] = replace(o, size="large" if o.size == "small" else "small")
        elif attr == "shape":
            objs[k] = replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
        else:
            used = {p.cell for p in objs}
            free = [c for c in (WORD_CELLS if scene.word else range(9)) if c not in used]
            if not free:
                continue
            objs[k] = replace(o, cell=rng.choice(free))
        new = Scene(scene.background, tuple(objs), scene.word)
        if split_of(new) == split and difference(scene, new, 1, 2):
            return new
    return None


# -----------------------------------------------------------------------------------------------
# drawing

@lru_cache(maxsize=8)
def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px)


#: Bounds of the varied drawing style (see :class:`Drawing`); the plain style is the all-neutral Drawing().
CANVAS = (160, 384)          # canvas side in px (the encoder resizes)
SMALL_SCALE = (0.7, 1.25)    # radius scale of small objects: 0.154-0.275 of a cell's side
LARGE_SCALE = (0.8, 1.05)    # radius scale of large objects: 0.32-0.42, always above any small one
MAX_OUTLINE = 0.02           # outline width, as a fraction of a cell's side
MARGIN = 0.04                # space an object keeps from its cell's border, as a fraction of its side
MAX_SHADE, MAX_TINT = 30, 12  # background jitter: all channels by +-shade, each channel by +-tint
MAX_NOISE = 6.0              # std of the Gaussian pixel noise, on the 0-255 scale
WORD_SCALE = (0.85, 1.15)    # size of the written word, relative to the plain drawing's


def _in(name: str, value, lo, hi) -> None:
    if not lo <= value <= hi:
        raise ValueError(f"Drawing.{name} must be in [{lo}, {hi}], got {value!r}")


@dataclass(frozen=True)
class Drawing:
    """How a scene is drawn. ``Drawing()`` is the plain drawing (every object centred in its cell,
    the two fixed radii, flat backgrounds, 224 px); :func:`random_drawing` varies every field within
    bounds that keep the scene graph true: an object never leaves its cell and small stays smaller
    than large.

    ``offsets[cell]`` is ``(dx, dy)`` in [-1, 1]: the share of the room an object leaves inside its
    cell (after ``MARGIN``) by which it moves right/down. ``small``/``large`` scale the radii,
    ``shade``/``tint`` shift the background's channels, ``noise`` adds Gaussian pixel noise (seeded
    by ``seed``), ``outline`` draws each shape's border in the word's ink colour, ``word_scale``
    sizes the written word. Frozen and hashable; ``id`` names it in file names and cache keys."""

    size: int = 224
    offsets: tuple[tuple[float, float], ...] = ((0.0, 0.0),) * 9
    small: float = 1.0
    large: float = 1.0
    shade: int = 0
    tint: tuple[int, int, int] = (0, 0, 0)
    noise: float = 0.0
    outline: float = 0.0
    word_scale: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 16:
            raise ValueError(f"Drawing.size must be an int >= 16 (px), got {self.size!r}")
        if len(self.offsets) != 9 or any(len(o) != 2 or not all(-1 <= v <= 1 for v in o) for o in self.offsets):
            raise ValueError(f"Drawing.offsets must be 9 (dx, dy) pairs in [-1, 1], one per cell, got {self.offsets!r}")
        _in("small", self.small, *SMALL_SCALE)
        _in("large", self.large, *LARGE_SCALE)
        _in("shade", self.shade, -MAX_SHADE, MAX_SHADE)
        if len(self.tint) != 3:
            raise ValueError(f"Drawing.tint must be 3 channel shifts, got {self.tint!r}")
        for t in self.tint:
            _in("tint", t, -MAX_TINT, MAX_TINT)
        _in("noise", self.noise, 0.0, MAX_NOISE)
        _in("outline", self.outline, 0.0, MAX_OUTLINE)
        _in("word_scale", self.word_scale, *WORD_SCALE)

    @property
    def id(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:10]

    def radius(self, size: str) -> float:
        """An object's radius, as a fraction of a cell's side."""
        return RADIUS[size] * (self.small if size == "small" else self.large)

    def center(self, o: Obj) -> tuple[float, float]:
        """Centre of object ``o``, in cell units (the grid is 3 x 3 cells)."""
        room = max(0.0, 0.5 - MARGIN - self.radius(o.size) - self.outline)
        dx, dy = self.offsets[o.cell]
        return o.cell % 3 + 0.5 + dx * room, o.cell // 3 + 0.5 + dy * room

    def background_rgb(self, background: str) -> tuple[int, int, int]:
        return tuple(min(255, max(0, c + self.shade + t)) for c, t in zip(BACKGROUNDS[background], self.tint))


PLAIN = Drawing()


def random_drawing(rng: random.Random) -> Drawing:
    """A varied :class:`Drawing`, drawn from ``rng`` (deterministic in its state)."""
    u = lambda lo, hi: round(rng.uniform(lo, hi), 3)  # noqa: E731
    return Drawing(
        size=rng.randint(*CANVAS),
        offsets=tuple((u(-1, 1), u(-1, 1)) for _ in range(9)),
        small=u(*SMALL_SCALE), large=u(*LARGE_SCALE),
        shade=rng.randint(-MAX_SHADE, MAX_SHADE),
        tint=tuple(rng.randint(-MAX_TINT, MAX_TINT) for _ in range(3)),
        noise=u(1.0, MAX_NOISE) if rng.random() < 0.5 else 0.0,
        outline=u(0.005, MAX_OUTLINE) if rng.random() < 0.5 else 0.0,
        word_scale=u(*WORD_SCALE),
        seed=rng.randrange(2 ** 31))


def draw(scene: Scene, size: int | None = None, drawing: Drawing | None = None) -> Image.Image:
    """Render a scene as a ``size`` x ``size`` RGB image (deterministic). ``drawing=None`` is the plain
    drawing; ``size`` defaults to the drawing's (224 for the plain one) and overrides it when given."""
    drawing = drawing or PLAIN
    size = size or drawing.size
    s = 2 * size  # draw at 2x and downsample, for smooth edges
    im = Image.new("RGB", (s, s), drawing.background_rgb(scene.background))
    d = ImageDraw.Draw(im)
    cell = s / 3
    ink = INK[scene.background]
    line = {"outline": ink, "width": max(1, round(drawing.outline * cell))} if drawing.outline else {}
    for o in scene.objects:
        cx, cy = (v * cell for v in drawing.center(o))
        r, fill = drawing.radius(o.size) * cell, COLORS[o.color]
        if o.shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, **line)
        elif o.shape == "square":
            h = 0.85 * r
            d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill, **line)
        elif o.shape == "triangle":  # pointing up, shifted down so it sits centred in its cell
            pts = [(cx + r * math.cos(a), cy + 0.25 * r + r * math.sin(a))
                   for a in (math.radians(-90), math.radians(30), math.radians(150))]
            d.polygon(pts, fill=fill, **line)
        else:  # five-pointed star
            pts = [(cx + rr * math.cos(a), cy + rr * math.sin(a))
                   for i in range(10)
                   for rr, a in [(r if i % 2 == 0 else 0.45 * r, math.radians(-90 + 36 * i))]]
            d.polygon(pts, fill=fill, **line)
    if scene.word:
        d.text((s / 2, s / 2), scene.word, fill=ink, font=_font(int(0.2 * s * drawing.word_scale)), anchor="mm",
               stroke_width=max(1, s // 160), stroke_fill=ink)
    im = im.resize((size, size), Image.LANCZOS)
    if drawing.noise:
        a = np.asarray(im).astype(np.float32)
        a += np.random.default_rng(drawing.seed).normal(0.0, drawing.noise, a.shape).astype(np.float32)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))
    return im


@dataclass(frozen=True)
class LazyImage:
    """An image of a conversation, drawn only when ``load()`` is called; ``drawing`` None = plain."""

    scene: Scene
    size: int = 224
    drawing: Drawing | None = None

    def load(self) -> Image.Image:
        return draw(self.scene, self.size, self.drawing)

    @property
    def file_name(self) -> str:
        """``<scene id>.png`` for the plain drawing, ``<scene id>-<drawing id>-<size>.png`` otherwise."""
        if self.drawing is None and self.size == 224:
            return f"{self.scene.id}.png"
        return f"{self.scene.id}-{(self.drawing or PLAIN).id}-{self.size}.png"


# -----------------------------------------------------------------------------------------------
# per-image labels (what the scene graph says about every cell: the "words" projection's targets)

#: The concept space of the ``words`` projection (``visualchat.projection.Words``) for this world:
#: the 3x3 cells by name, three cell heads (each with an "empty" class) and the written word, read
#: from the middle row where it is drawn.
CONCEPTS = {
    "cells": list(POSITIONS),
    "cell_heads": {"size": ["empty", *SIZES], "color": ["empty", *COLORS], "shape": ["empty", *SHAPES]},
    "image_heads": {"word": {"cells": [3, 4, 5], "labels": ["none", *WORDS]}},
}


def concept_labels(scene: Scene) -> list[int]:
    """The scene's label of every head of :data:`CONCEPTS`: per cell (reading order) its size, colour
    and shape class (0 = empty), then the word's class (0 = none)."""
    heads = CONCEPTS["cell_heads"]
    cells = [[0, 0, 0] for _ in POSITIONS]
    for o in scene.objects:
        cells[o.cell] = [heads["size"].index(o.size), heads["color"].index(o.color), heads["shape"].index(o.shape)]
    word = CONCEPTS["image_heads"]["word"]["labels"].index(scene.word or "none")
    return [y for c in cells for y in c] + [word]


# -----------------------------------------------------------------------------------------------
# questions: each returns (question, answer), or None when it cannot be asked of these scenes

def describe(scene: Scene) -> str:
    items = [f"{'an' if o.color[0] in 'aeiou' else 'a'} {o.color} {o.shape}" for o in scene.objects]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def q_describe(rng, sc: Scene, n: int):
    return f"Describe Image {n}.", describe(sc)


# The phrasing of each question, written once: the generator's random choices (q_*) and the
# exhaustive list (all_questions) both build their questions here.
def count_qa(sc: Scene, shape: str | None, n: int) -> tuple[str, str]:
    return f"How many {shape or 'shape'}s are in Image {n}?", str(sc.count(shape))


def color_qa(o: Obj, n: int) -> tuple[str, str]:
    return f"What color is the {o.shape} in Image {n}?", o.color


def where_qa(o: Obj, n: int) -> tuple[str, str]:
    return f"Where is the {o.color} {o.shape} in Image {n}?", o.position


def word_qa(sc: Scene, n: int) -> tuple[str, str]:
    return f"What word is written in Image {n}?", sc.word or "none"


def more_qa(scenes: list[Scene], a: int, b: int, shape: str | None) -> tuple[str, str]:
    """Images a and b (0-based), whose counts of ``shape`` differ."""
    winner = a if scenes[a].count(shape) > scenes[b].count(shape) else b
    return f"Which image has more {shape or 'shape'}s, Image {a + 1} or Image {b + 1}?", f"Image {winner + 1}"


def diff_qa(i: int, j: int, answer: str) -> tuple[str, str]:
    return f"What is different between Image {i} and Image {j}?", answer


def total_qa(scenes: list[Scene], seen: list[int], shape: str | None) -> tuple[str, str]:
    return f"How many {shape or 'shape'}s are there in all the images?", str(sum(scenes[k].count(shape) for k in seen))


def q_count(rng, sc: Scene, n: int):
    if rng.random() < 0.5:
        return count_qa(sc, None, n)
    return count_qa(sc, rng.choice(SHAPES), n)


def _unique_by_shape(sc: Scene) -> list[Obj]:
    return [o for o in sc.objects if sc.count(o.shape) == 1]


def q_color(rng, sc: Scene, n: int):
    unique = _unique_by_shape(sc)
    if not unique:
        return None
    return color_qa(rng.choice(unique), n)


def _unique_by_name(sc: Scene) -> list[Obj]:
    return [o for o in sc.objects if sum(p.shape == o.shape and p.color == o.color for p in sc.objects) == 1]


def q_where(rng, sc: Scene, n: int):
    unique = _unique_by_name(sc)
    if not unique:
        return None
    return where_qa(rng.choice(unique), n)


def q_word(rng, sc: Scene, n: int):
    if sc.word is None and rng.random() < 0.7:  # ask "none" questions less often
        return None
    return word_qa(sc, n)


def difference(a: Scene, b: Scene, i: int, j: int) -> str | None:
    """The canonical answer when scenes ``a`` (Image i) and ``b`` (Image j) differ in exactly one
    attribute of one object that can be named unambiguously; else None."""
    if a.background != b.background or a.word != b.word or len(a.objects) != len(b.objects):
        return None
    only_a, only_b = set(a.objects) - set(b.objects), set(b.objects) - set(a.objects)
    if len(only_a) != 1 or len(only_b) != 1:
        return None
    oa, ob = only_a.pop(), only_b.pop()
    changed = [f for f in ("shape", "color", "size", "cell") if getattr(oa, f) != getattr(ob, f)]
    if len(changed) != 1:
        return None
    named = oa in _unique_by_name(a) and ob in _unique_by_name(b)
    if changed == ["color"] and a.count(oa.shape) == 1:
        return f"the {oa.shape} is {oa.color} in Image {i} and {ob.color} in Image {j}"
    if changed == ["size"] and named:
        return f"the {oa.color} {oa.shape} is {oa.size} in Image {i} and {ob.size} in Image {j}"
    if changed == ["cell"] and named:
        return f"the {oa.color} {oa.shape} is at {oa.position} in Image {i} and at {ob.position} in Image {j}"
    if changed == ["shape"]:
        return f"the shape at {oa.position} is a {oa.shape} in Image {i} and a {ob.shape} in Image {j}"
    return None


def q_more(rng, scenes: list[Scene], seen: list[int]):
    a, b = sorted(rng.sample(seen, 2))
    options = [x for x in (None,) + SHAPES if scenes[a].count(x) != scenes[b].count(x)]
    if not options:
        return None
    return more_qa(scenes, a, b, rng.choice(options))


def q_diff(rng, scenes: list[Scene], seen: list[int]):
    found = [(a + 1, b + 1, d) for a in seen for b in seen if a < b
             for d in [difference(scenes[a], scenes[b], a + 1, b + 1)] if d]
    if not found:
        return None
    return diff_qa(*rng.choice(found))


def q_total(rng, scenes: list[Scene], seen: list[int]):
    return total_qa(scenes, seen, rng.choice((None,) + SHAPES))


SINGLE = {"describe": q_describe, "count": q_count, "color": q_color, "where": q_where, "word": q_word}
CROSS = {"more": q_more, "diff": q_diff, "total": q_total}
CATEGORIES = ("single", "cross", "refer_back")
ROUND_TYPES = tuple(f"{c}/{t}" for c in CATEGORIES for t in (CROSS if c == "cross" else SINGLE))


def ask(rng: random.Random, scenes: list[Scene], new: list[int], seen: list[int]) -> tuple[str, str, str]:
    """(type tag, question, answer) for a round that brings images ``new`` with ``seen`` shown so far."""
    old = [k for k in seen if k not in new]
    cats = [("single", 6)] * bool(new) + [("refer_back", 2 if new else 6)] * bool(old) + [("cross", 4)] * (len(seen) >= 2)
    while True:  # single/count and cross/total always succeed, so this ends
        cat = rng.choices([c for c, _ in cats], weights=[w for _, w in cats])[0]
        if cat == "cross":
            fine = rng.choice(list(CROSS))
            qa = CROSS[fine](rng, scenes, seen)
        else:
            k = rng.choice(new if cat == "single" else old)
            fine = rng.choice(list(SINGLE))
            qa = SINGLE[fine](rng, scenes[k], k + 1)
        if qa:
            return f"{cat}/{fine}", qa[0], qa[1]


# -----------------------------------------------------------------------------------------------
# samples

@dataclass
class ShapesSample:
    conversation: Conversation  # Round.images hold LazyImage objects
    round_types: list[str]      # one "<category>/<type>" tag per round
    scenes: list[Scene]         # scene of Image 1, Image 2, ...
    drawings: list[Drawing | None] | None = None  # drawing of Image 1, Image 2, ... (None: all plain)

    def materialize(self, size: int | None = None) -> Conversation:
        """The conversation with every LazyImage drawn as a PIL image (at ``size`` px when given, else
        at its own size: 224 for the plain drawing)."""
        rounds = [Round(r.question, [draw(im.scene, size or im.size, im.drawing) for im in r.images], r.answer)
                  for r in self.conversation.rounds]
        return Conversation(rounds, self.conversation.system)


def category(tag: str) -> str:
    return tag.split("/")[0]


#: Conversation shapes: "mixed" (the default, and the test set's) and "dense" (fewer images, more
#: rounds: about 2.5 times as many answers per token, for training on a small compute budget).
STYLES = ("mixed", "dense")
#: How the images are drawn: "plain" (every scene the same way: the test set's) or "varied" (each
#: image its own seeded :class:`Drawing`; the same questions and scenes as "plain").
DRAWINGS = ("plain", "varied")


def make_sample(split: str, index: int, seed: int = 0, style: str = "mixed", drawing: str = "plain") -> ShapesSample:
    """Sample ``index`` of ``(split, seed, style)``; depends on nothing else (and not on global random).
    ``drawing="varied"`` draws each image with its own :func:`random_drawing`, from a random stream of
    its own: the questions, answers and scenes are those of the plain sample."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    if drawing not in DRAWINGS:
        raise ValueError(f"unknown drawing {drawing!r}; expected one of {DRAWINGS}")
    if style == "mixed":
        rng = random.Random(f"shapes-v{SHAPES_VERSION}/{split}/{seed}/{index}")
        n_images = rng.choices((1, 2, 3, 4), weights=(3, 3, 2, 2))[0]
        n_rounds = rng.randint(1, 4)
    else:
        rng = random.Random(f"shapes-v{SHAPES_VERSION}/{style}/{split}/{seed}/{index}")
        n_images = rng.choices((1, 2, 3), weights=(3, 3, 2))[0]
        n_rounds = rng.randint(5, 8)
    arrivals = sorted([0] + [rng.randrange(n_rounds) for _ in range(n_images - 1)])  # round of each image
    scenes: list[Scene] = []
    while len(scenes) < n_images:
        scene = None
        if scenes and rng.random() < P_VARIANT:
            scene = vary(rng, rng.choice(scenes), split)
        scene = scene or random_scene(rng, split)
        if scene not in scenes:
            scenes.append(scene)
    drawings: list[Drawing | None] = [None] * n_images
    if drawing == "varied":
        drng = random.Random(f"shapes-v{SHAPES_VERSION}/drawing/{style}/{split}/{seed}/{index}")
        drawings = [random_drawing(drng) for _ in range(n_images)]
    images = [LazyImage(sc, d.size, d) if d else LazyImage(sc) for sc, d in zip(scenes, drawings)]
    rounds, types, asked = [], [], set()
    for r in range(n_rounds):
        new = [k for k, a in enumerate(arrivals) if a == r]
        seen = [k for k, a in enumerate(arrivals) if a <= r]
        for _ in range(20):  # avoid asking the same question twice
            tag, q, a = ask(rng, scenes, new, seen)
            if q not in asked:
                break
        asked.add(q)
        rounds.append(Round(q, [images[k] for k in new], a))
        types.append(tag)
    return ShapesSample(Conversation(rounds, DEFAULT_SYSTEM), types, scenes, drawings)


def generate(split: str, n: int, seed: int = 0, style: str = "mixed", drawing: str = "plain") -> list[ShapesSample]:
    """``n`` samples of ``split``; cheap (no drawing) and deterministic in (split, n, seed, style, drawing)."""
    return [make_sample(split, i, seed, style, drawing) for i in range(n)]


def fingerprint(samples: list[ShapesSample]) -> str:
    """Hash of the questions, answers, types and scene graphs (not pixels, which may vary with Pillow)."""
    h = hashlib.sha256()
    for s in samples:
        rounds = [[r.question, r.answer, [im.scene.key for im in r.images]] for r in s.conversation.rounds]
        h.update(json.dumps([rounds, s.round_types]).encode())
    return h.hexdigest()[:16]


def to_record(sample: ShapesSample, image_dir: str = "images") -> dict:
    return {"system": sample.conversation.system,
            "rounds": [{"images": [f"{image_dir}/{im.file_name}" for im in r.images],
                        "question": r.question, "answer": r.answer, "type": t}
                       for r, t in zip(sample.conversation.rounds, sample.round_types)]}


def save_jsonl(samples: list[ShapesSample], out_dir: str, name: str = "conversations.jsonl",
               size: int = 224) -> str:
    """Write each distinct image once as ``out_dir/images/<file name>`` (``<scene id>.png`` for a plain
    drawing, drawn at ``size``; ``<scene id>-<drawing id>-<px>.png`` for a varied one, at its own
    size) and one conversation a line to ``out_dir/<name>`` (image paths relative to ``out_dir``).
    Returns the jsonl path."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    done: set[str] = set()
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
        for s in samples:
            for im in s.conversation.images:
                if im.file_name not in done:
                    draw(im.scene, size if im.drawing is None else im.size, im.drawing).save(
                        os.path.join(out_dir, "images", im.file_name))
                    done.add(im.file_name)
            f.write(json.dumps(to_record(s)) + "\n")
    return path


def all_questions(scenes: list[Scene]) -> list[tuple[str, str, str]]:
    """Every question the generator can ask about ``scenes`` shown as Image 1, 2, ... (all of them
    already shown), as ``(type tag, question, answer)``: per image describe, count (all shapes and each
    shape), colour of each unique shape, place of each unique colour+shape, word; per pair "more" for
    each shape with different counts and "diff" where it applies; "total" for all shapes and each shape."""
    out = []
    for k, sc in enumerate(scenes, 1):
        out.append(("single/describe", *q_describe(None, sc, k)))
        out += [("single/count", *count_qa(sc, x, k)) for x in (None,) + SHAPES]
        out += [("single/color", *color_qa(o, k)) for o in _unique_by_shape(sc)]
        out += [("single/where", *where_qa(o, k)) for o in _unique_by_name(sc)]
        out.append(("single/word", *word_qa(sc, k)))
    for a in range(len(scenes)):
        for b in range(a + 1, len(scenes)):
            out += [("cross/more", *more_qa(scenes, a, b, x)) for x in (None,) + SHAPES
                    if scenes[a].count(x) != scenes[b].count(x)]
            d = difference(scenes[a], scenes[b], a + 1, b + 1)
            if d:
                out.append(("cross/diff", *diff_qa(a + 1, b + 1, d)))
    if len(scenes) >= 2:
        out += [("cross/total", *total_qa(scenes, list(range(len(scenes))), x)) for x in (None,) + SHAPES]
    return out


def example_samples() -> list[ShapesSample]:
    """The three test conversations whose images are ``assets/examples/shapes_1.png`` ... ``shapes_5.png``:
    one image with a word; two images with a "what differs" round; two images, the second arriving in
    round 2, with a cross-image round."""
    wants = [
        lambda s: len(s.scenes) == 1 and s.scenes[0].word and len(s.round_types) >= 2,
        lambda s: len(s.scenes) == 2 and "cross/diff" in s.round_types,
        lambda s: len(s.scenes) == 2 and len(s.conversation.rounds[0].images) == 1
                  and "cross/more" in s.round_types,
    ]
    samples = generate("test", 1000)
    return [next(s for s in samples if want(s)) for want in wants]


def save_examples(out_dir: str) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """Save the images of :func:`example_samples` as ``shapes_1.png`` ... ``shapes_5.png`` (the app's
    examples). Returns (file names, [(question, answer)]) per conversation."""
    os.makedirs(out_dir, exist_ok=True)
    out, k = [], 1
    for s in example_samples():
        names = []
        for scene in s.scenes:
            names.append(f"shapes_{k}.png")
            draw(scene).save(os.path.join(out_dir, names[-1]))
            k += 1
        out.append((names, [(r.question, r.answer) for r in s.conversation.rounds]))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description="Write the synthetic Shapes conversations as PNGs + jsonl.")
    p.add_argument("--split", choices=SPLITS, default="train")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--style", choices=STYLES, default="mixed", help="dense: 1-3 images, 5-8 rounds")
    p.add_argument("--drawing", choices=DRAWINGS, default="plain",
                   help="varied: each image drawn with its own seeded offsets, radii, background, noise, size")
    p.add_argument("--out", help="output folder")
    p.add_argument("--examples", help="instead, save example images (shapes_1.png ...) to this folder")
    args = p.parse_args()
    if args.examples:
        for names, qas in save_examples(args.examples):
            print(names, qas)
    elif args.out:
        print(save_jsonl(generate(args.split, args.n, args.seed, args.style, args.drawing), args.out))
    else:
        p.error("give --out or --examples")


if __name__ == "__main__":
    main()
