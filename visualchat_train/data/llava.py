"""LLaVA-Instruct-150K: ``llava`` (detail_23k + complex_reasoning_77k) and ``llava_dial`` (conversation_58k).

Published format (https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K), one JSON list per
file::

    [{"id": "000000033471", "image": "000000033471.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat are the colors of the bus?"},
                        {"from": "gpt", "value": "The bus is white and red."}, ...]}, ...]

Layout under ``data_path`` (the DeepSpeed-VisualChat README's): ``llava/<file>.json`` — or the
file straight in ``data_path`` as the Hugging Face repository ships it — and the COCO 2017 train
images in ``coco/train2017/``.

``llava`` keeps only the first question/answer pair of each sample, as the reference did
(``LlavaDataset.process_text`` reads ``conversations[0]`` and ``[1]``); detail_23k and
complex_reasoning_77k samples hold one pair each, so nothing is lost in practice. ``llava_dial``
keeps every pair as a round of one conversation. Either way the image goes in the first round
and the ``<image>`` marker is removed from the text.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from visualchat.template import Conversation, Round

from ._common import (DEFAULT_MAX_IMAGES, LoadStats, find_first, limit_images, pairs, read_json, require_dir,
                      strip_marker)

LLAVA_FILES = ("detail_23k.json", "complex_reasoning_77k.json")
LLAVA_DIAL_FILES = ("conversation_58k.json",)
ALL_LLAVA_FILES = LLAVA_FILES + LLAVA_DIAL_FILES


def coco_dir(data_path: str) -> str:
    return os.path.join(data_path, "coco", "train2017")


def llava_file(data_path: str, name: str) -> str:
    """``<data_path>/llava/<name>`` (reference layout) or ``<data_path>/<name>``."""
    return find_first([os.path.join(data_path, "llava", name), os.path.join(data_path, name)], what=f"LLaVA {name}")


def llava_files(data_path: str, names) -> list[str]:
    """Every file of ``names``; one FileNotFoundError names all that are missing."""
    found, missing = [], []
    for n in names:
        try:
            found.append(llava_file(data_path, n))
        except FileNotFoundError:
            missing.append(os.path.join(data_path, "llava", n))
    if missing:
        raise FileNotFoundError(
            "LLaVA: missing data file(s): " + ", ".join(missing)
            + " (also looked directly in data_path; download from "
            "https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K)"
        )
    return found


def qa_pairs(sample: Any) -> list[tuple[str, str]] | None:
    """The (question, answer) pairs of one LLaVA sample, markers stripped; None if malformed."""
    turns = sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    out = []
    for q, a in pairs(turns):
        if not (isinstance(q, dict) and isinstance(a, dict)):
            return None
        if q.get("from") != "human" or a.get("from") != "gpt":
            return None
        qv, av = q.get("value"), a.get("value")
        if not isinstance(qv, str) or not isinstance(av, str):
            return None
        out.append((strip_marker(qv), av.strip()))
    return out


def iter_samples(paths: list[str]) -> Iterator[tuple[str, Any]]:
    for p in paths:
        data = read_json(p)
        if not isinstance(data, list):
            raise ValueError(f"{p}: expected a JSON list of samples, got {type(data).__name__}")
        for s in data:
            yield p, s


def _load(name: str, data_path: str, files, first_pair_only: bool, max_images, stats) -> list[Conversation]:
    paths = llava_files(data_path, files)
    images = coco_dir(data_path)
    require_dir(images, what=f"{name} (COCO 2017 train images)")
    st = LoadStats(name)
    out: list[Conversation] = []
    for _, s in iter_samples(paths):
        qa = qa_pairs(s)
        if not qa:
            st.skip("malformed")
            continue
        image = s.get("image")
        if not isinstance(image, str) or not image:
            st.skip("no_image")
            continue
        if first_pair_only:
            qa = qa[:1]
        rounds = [Round(question=q, answer=a) for q, a in qa]
        rounds[0].images = [os.path.join(images, image)]
        conv = limit_images(Conversation(rounds=rounds), max_images)
        if conv is None:
            st.skip("too_many_images")
            continue
        out.append(conv)
    return st.finish(out, stats)


def load_llava(data_path: str, *, files=LLAVA_FILES, max_images: int | None = DEFAULT_MAX_IMAGES,
               stats: dict | None = None) -> list[Conversation]:
    """detail_23k + complex_reasoning_77k: one round per sample (the first QA pair, as the reference)."""
    return _load("llava", data_path, files, True, max_images, stats)


def load_llava_dial(data_path: str, *, files=LLAVA_DIAL_FILES, max_images: int | None = DEFAULT_MAX_IMAGES,
                    stats: dict | None = None) -> list[Conversation]:
    """conversation_58k: every QA pair a round, the image in the first."""
    return _load("llava_dial", data_path, files, False, max_images, stats)


def llava_by_image(data_path: str, files=ALL_LLAVA_FILES) -> dict[str, list[list[tuple[str, str]]]]:
    """COCO file name -> the QA-pair lists of every LLaVA sample about that image, in file order
    (used by ``llava_otter_blend``)."""
    by_image: dict[str, list[list[tuple[str, str]]]] = {}
    for _, s in iter_samples(llava_files(data_path, files)):
        qa = qa_pairs(s)
        image = s.get("image") if isinstance(s, dict) else None
        if qa and isinstance(image, str) and image:
            by_image.setdefault(image, []).append(qa)
    return by_image
