"""Check the images a set of conversations refers to, once each, before training.

A missing or corrupt image never crashes training and is never replaced by a blank one: the
conversations that refer to it are left out, and each bad image is logged once.

    kept, skipped = validate_images(conversations)          # cache shared across calls if given
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from visualchat.images import ImageError, open_image
from visualchat.template import Conversation

log = logging.getLogger("visualchat_train.data.validate")


def describe_ref(ref: Any) -> str:
    """A short printable name for an image reference (never a whole base64 string)."""
    if isinstance(ref, str) and ref.startswith("base64:"):
        data = ref[len("base64:"):]
        return f"base64 image ({len(data):,} chars, starting {data[:16]!r})"
    if hasattr(ref, "image_ref") and hasattr(ref, "path"):  # a Base64Slice
        return str(ref)
    if isinstance(ref, (str, os.PathLike)):
        return os.fspath(ref)
    return f"<{type(ref).__name__}>"


def check_image(ref: Any, open_fn: Callable[[Any], Any] = open_image) -> str | None:
    """None if ``ref`` opens as an image, else the reason it does not."""
    try:
        open_fn(ref)
        return None
    except ImageError as e:
        return str(e)


def _key(ref: Any) -> Any:
    try:
        hash(ref)
        return ref
    except TypeError:  # e.g. an unhashable in-memory image object: checked per object
        return ("object", id(ref))


def validate_images(conversations: Sequence[Conversation], *, cache: dict | None = None, workers: int = 1,
                    open_fn: Callable[[Any], Any] = open_image) -> tuple[list[Conversation], int]:
    """Return ``(kept, skipped)``: the conversations all of whose images open, in order, and how many
    were left out.

    Each distinct reference is opened once; ``cache`` (reference -> None or the error message) can
    be shared between calls, e.g. across data sets that use the same COCO images, so an image is
    neither opened nor logged twice. ``workers > 1`` opens images on that many threads."""
    if cache is None:
        cache = {}
    todo: list[Any] = []
    seen: set = set()
    for conv in conversations:
        for ref in conv.images:
            k = _key(ref)
            if k not in cache and k not in seen:
                seen.add(k)
                todo.append(ref)

    if workers > 1 and len(todo) > 1:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            results = list(ex.map(lambda r: check_image(r, open_fn), todo))
    else:
        results = [check_image(r, open_fn) for r in todo]
    for ref, err in zip(todo, results):
        cache[_key(ref)] = err
        if err is not None:
            log.warning("skipping conversations with bad image %s: %s", describe_ref(ref), err)

    kept = [c for c in conversations if all(cache[_key(r)] is None for r in c.images)]
    skipped = len(conversations) - len(kept)
    if skipped:
        bad = sum(1 for k in seen if cache[k] is not None)
        log.info("image check: kept %d conversations, skipped %d (%d bad images)", len(kept), skipped, bad)
    return kept, skipped
