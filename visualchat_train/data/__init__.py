"""Data sets of the DeepSpeed-VisualChat blend, read from the files as published.

Every loader is ``load_<name>(data_path, **opts) -> list[Conversation]``; each round's ``images``
holds image *references* — a path string, or ``"base64:<data>"`` for data sets that embed their
images — which the trainer opens lazily with :func:`visualchat.images.open_image`. Image i of a
conversation is always the i-th image of the published list. Check the images first with
:func:`visualchat_train.data.validate.validate_images`; pack and trim with :mod:`visualchat_train.data.packing`.

Expected layout under ``data_path`` (the DeepSpeed-VisualChat README's)::

    coco/train2017/000000xxxxxx.jpg                 llava, llava_dial, otter_mimicit_cgd, llava_otter_blend
    llava/detail_23k.json                           llava              (also accepted: data_path/<file>)
    llava/complex_reasoning_77k.json                llava
    llava/conversation_58k.json                     llava_dial
    MIMIC-IT/CGD_instructions.json                  otter_mimicit_cgd  (also: MIMIC-IT/CGD/, CGD/)
    MIMIC-IT/{SD,SN,TVC,VST}_instructions.json      otter_mimicit_{sd,sn,tvc,vst}
    MIMIC-IT/{SD,SN,TVC,VST}.json                   (image_id -> base64, next to the instructions)
    SparklesDialogue{CC,VG}/annotations/SparklesDialogue{CC,VG}.json    sparkles_dialogue
    SparklesDialogue{CC,VG}/images/<image_id>.jpg

The original code's other sets (see :mod:`visualchat_train.data.vqa` for their files): ``minigpt4``
(cc_sbu_align/), ``aokvqa`` (aokvqa/annotations/ + coco/train2017/), ``coco_caption``
(coco_caption/dataset.json + coco/2014/), ``ocr_vqa`` (OCR_VQA/) and the generic ``vqa`` (vqa/*.json).

``jsonl`` reads our own format (see :mod:`visualchat_train.data.jsonl`); ``shapes`` is the synthetic set of
:mod:`visualchat_train.data.shapes` (``data_path`` unused; options ``split``, ``n``, ``seed``, ``style``);
``shapes_dense`` is the same world with 5-8 rounds about 1-3 images per conversation;
``shapes_varied`` is ``shapes`` with every image drawn its own way (``drawing="varied"``: objects
moved inside their cells, other radii, backgrounds, noise, outlines and canvas sizes). With the same
seed its conversations are those of ``shapes``, so mixing both shows each conversation in both
drawings (options as ``shapes``; ``style="dense"`` also works).

Common options: ``max_images`` (default 8; trailing rounds are dropped to stay within it) and
``stats`` (a dict the loader fills with its counts of loaded and skipped samples).
"""
from __future__ import annotations

from typing import Callable

from visualchat.template import Conversation

from ._common import DEFAULT_MAX_IMAGES, LoadStats, limit_images
from .blend import load_llava_otter_blend
from .jsonl import load_jsonl
from .llava import load_llava, load_llava_dial
from .mimicit import (load_otter_mimicit_cgd, load_otter_mimicit_sd, load_otter_mimicit_sn, load_otter_mimicit_tvc,
                      load_otter_mimicit_vst)
from .sparkles import load_sparkles_dialogue
from .vqa import load_aokvqa, load_coco_caption, load_minigpt4, load_ocr_vqa, load_vqa


def load_shapes(data_path: str | None = None, *, split: str = "train", n: int = 1000, seed: int = 0,
                style: str = "mixed", drawing: str = "plain", max_images: int | None = DEFAULT_MAX_IMAGES,
                stats: dict | None = None) -> list[Conversation]:
    """The synthetic shapes set (``visualchat_train.data.shapes.generate(split, n, seed, style, drawing)``), imported on use."""
    try:
        from . import shapes  # noqa: PLC0415 - written separately; imported only when asked for
    except ModuleNotFoundError as e:
        if e.name not in ("visualchat_train.data.shapes", __name__ + ".shapes"):
            raise
        raise ImportError("data set 'shapes' needs visualchat_train/data/shapes.py (generate(split, n, seed)), "
                          "which is not there yet") from None
    st = LoadStats("shapes" + ("" if style == "mixed" else f"_{style}") + ("" if drawing == "plain" else f"_{drawing}"))
    out = []
    for s in shapes.generate(split, n, seed, style, drawing):
        conv = limit_images(s.conversation, max_images)
        if conv is None:
            st.skip("too_many_images")
        else:
            out.append(conv)
    return st.finish(out, stats)


def load_shapes_dense(data_path: str | None = None, **opts) -> list[Conversation]:
    """``shapes`` in its dense style: 5-8 rounds about 1-3 images (more answers per training token)."""
    return load_shapes(data_path, style="dense", **opts)


def load_shapes_varied(data_path: str | None = None, **opts) -> list[Conversation]:
    """``shapes`` with each image drawn its own seeded way (``drawing="varied"``); same conversations."""
    return load_shapes(data_path, drawing="varied", **opts)


DATASETS: dict[str, Callable[..., list[Conversation]]] = {
    "llava": load_llava,
    "llava_dial": load_llava_dial,
    "otter_mimicit_cgd": load_otter_mimicit_cgd,
    "otter_mimicit_sd": load_otter_mimicit_sd,
    "otter_mimicit_sn": load_otter_mimicit_sn,
    "otter_mimicit_tvc": load_otter_mimicit_tvc,
    "otter_mimicit_vst": load_otter_mimicit_vst,
    "sparkles_dialogue": load_sparkles_dialogue,
    "llava_otter_blend": load_llava_otter_blend,
    "minigpt4": load_minigpt4,
    "aokvqa": load_aokvqa,
    "coco_caption": load_coco_caption,
    "ocr_vqa": load_ocr_vqa,
    "vqa": load_vqa,
    "jsonl": load_jsonl,
    "shapes": load_shapes,
    "shapes_dense": load_shapes_dense,
    "shapes_varied": load_shapes_varied,
}


def load_dataset(name: str, data_path: str, **opts) -> list[Conversation]:
    """Load data set ``name`` from ``data_path``.

    Raises ValueError (listing the valid names) for an unknown name, and FileNotFoundError naming
    the expected file(s) when the data set's files are not under ``data_path``."""
    try:
        loader = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(sorted(DATASETS))}") from None
    return loader(data_path, **opts)


__all__ = ["DATASETS", "load_dataset"] + [f.__name__ for f in DATASETS.values()]
