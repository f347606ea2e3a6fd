"""Helpers shared by the data set loaders: finding files, reading JSON, cleaning text, counting skips.

Every loader returns ``list[Conversation]`` whose rounds hold *image references* (a path string,
or ``"base64:<data>"`` for data sets that embed their images), never opened images; the trainer
opens them lazily with :func:`visualchat.images.open_image`.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Any, Iterable, Sequence

from visualchat.template import Conversation

log = logging.getLogger("visualchat_train.data")

#: Most images one training sample may hold (the paper trains with at most 8).
DEFAULT_MAX_IMAGES = 8


class LoadStats:
    """Counts what a loader kept and why it skipped the rest; logs one summary line."""

    def __init__(self, name: str):
        self.name = name
        self.loaded = 0
        self.skipped: Counter[str] = Counter()

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def as_dict(self) -> dict[str, int]:
        out = {"loaded": self.loaded, "skipped": self.total_skipped}
        out.update({f"skipped_{k}": v for k, v in sorted(self.skipped.items())})
        return out

    def finish(self, convs: list[Conversation], stats: dict | None = None) -> list[Conversation]:
        self.loaded = len(convs)
        if self.skipped:
            why = ", ".join(f"{v} {k}" for k, v in sorted(self.skipped.items()))
            log.info("%s: loaded %d conversations, skipped %d (%s)", self.name, self.loaded, self.total_skipped, why)
        else:
            log.info("%s: loaded %d conversations", self.name, self.loaded)
        if stats is not None:
            stats.update(self.as_dict())
        return convs


# -- files ---------------------------------------------------------------------------------------
def require_dir(path: str, what: str = "") -> None:
    if not os.path.isdir(path):
        label = f"{what}: " if what else ""
        raise FileNotFoundError(f"{label}missing image folder: {path}")


def find_first(candidates: Sequence[str], what: str = "", kind: str = "file") -> str:
    """The first of ``candidates`` that exists; else a FileNotFoundError listing all of them."""
    test = os.path.isfile if kind == "file" else os.path.isdir
    for c in candidates:
        if test(c):
            return c
    label = f"{what}: " if what else ""
    raise FileNotFoundError(f"{label}missing {kind}; looked for " + " or ".join(candidates))


def read_json(path: str) -> Any:
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}") from None


# -- text ----------------------------------------------------------------------------------------
def strip_marker(text: str, marker: str = "<image>") -> str:
    """Remove ``marker`` and the whitespace around it, keeping the rest of the text as published.

    ``"<image>\\nWhat is it?"`` and ``"What is it?\\n<image>"`` give ``"What is it?"``; a marker in
    the middle of a sentence leaves one space."""
    if marker not in text:
        return text.strip()
    parts = [p.strip() for p in text.split(marker)]
    return " ".join(p for p in parts if p)


# -- shapes of conversations ---------------------------------------------------------------------
def limit_images(conv: Conversation, max_images: int | None = DEFAULT_MAX_IMAGES) -> Conversation | None:
    """Drop whole trailing rounds until the conversation holds at most ``max_images`` images.

    Returns ``conv`` itself when nothing had to go, a shorter copy otherwise, and None when even
    the first round brings more than ``max_images`` images."""
    if max_images is None or len(conv.images) <= max_images:
        return conv
    n = 0
    keep = 0
    for rnd in conv.rounds:
        if n + len(rnd.images) > max_images:
            break
        n += len(rnd.images)
        keep += 1
    if keep == 0:
        return None
    return Conversation(rounds=list(conv.rounds[:keep]), system=conv.system)


def even_subsample(items: Sequence[Any], k: int) -> list[Any]:
    """``k`` items spread evenly over ``items``, in their order; the first and last are kept."""
    n = len(items)
    if k >= n:
        return list(items)
    if k <= 0:
        return []
    if k == 1:
        return [items[0]]
    idx = [round(i * (n - 1) / (k - 1)) for i in range(k)]
    return [items[i] for i in idx]


def pairs(turns: Iterable[Any]) -> list[tuple[Any, Any]]:
    turns = list(turns)
    return [(turns[i], turns[i + 1]) for i in range(0, len(turns) - 1, 2)]

