"""SparklesDialogue (https://github.com/HYPJUDY/Sparkles): ``sparkles_dialogue``.

Published layout under ``data_path`` (the DeepSpeed-VisualChat README's; Sparkles' own tree has
them under ``data/``, also accepted)::

    SparklesDialogueCC/annotations/SparklesDialogueCC.json   SparklesDialogueCC/images/<image_id>.jpg
    SparklesDialogueVG/annotations/SparklesDialogueVG.json   SparklesDialogueVG/images/<image_id>.jpg

Each annotation file is a JSON list of ``{"dialogue": [message, ...]}`` (a bare message list is
accepted too), messages alternating user / assistant::

    {"role": "user", "content": "Compare the bus in IMAGE#804<Img><ImageHere></Img> with ...",
     "images": [{"image_id": 804, "caption": "..."}, ...]}
    {"role": "assistant", "content": "The bus in IMAGE#804 is ..."}

The generator (dataset/generate_SparklesDialogue.py) puts ``<Img><ImageHere></Img>`` right after
each image's mention and sorts a message's ``images`` by first appearance in its text, so the
published list order is the order of first appearance. We number images across the dialogue in
that order (a repeated id keeps its first number) and rewrite every ``IMAGE#<id>`` (also ``#<id>``
and a bare ``<id>`` directly before the tag, case-insensitive) to ``Image i``, in questions and
answers alike, then drop the ``<Img><ImageHere></Img>`` tags. The reference instead replaced ids
with random names ("image a", "the first image") that did not match the template's numbering.
Dialogues with an odd number of messages or out-of-order roles are skipped, as in the reference;
too many images drops trailing rounds (the reference dropped dialogues with more than 8).
"""
from __future__ import annotations

import os
import re
from typing import Any

from visualchat.template import Conversation, Round

from ._common import DEFAULT_MAX_IMAGES, LoadStats, find_first, limit_images, pairs, read_json, require_dir

SUBSETS = ("CC", "VG")
IMAGE_TAG = "<Img><ImageHere></Img>"


def subset_paths(data_path: str, subset: str) -> tuple[str, str]:
    """(annotation file, image folder) of one subset."""
    rel = os.path.join(f"SparklesDialogue{subset}", "annotations", f"SparklesDialogue{subset}.json")
    ann = find_first([os.path.join(data_path, rel), os.path.join(data_path, "data", rel)],
                     what=f"sparkles_dialogue {subset}")
    root = os.path.dirname(os.path.dirname(ann))
    return ann, os.path.join(root, "images")


def rewrite_image_refs(text: str, numbers: dict[str, int]) -> str:
    """``IMAGE#<id>`` -> ``Image <n>`` for the ids in ``numbers``; image tags removed."""
    if numbers:
        ids = "|".join(re.escape(i) for i in sorted(numbers, key=len, reverse=True))
        tagged = re.compile(rf"(?<!\w)(?:IMAGE\s*)?#?({ids}){re.escape(IMAGE_TAG)}", re.IGNORECASE)
        text = tagged.sub(lambda m: f"Image {numbers[m.group(1)]}", text)
        mention = re.compile(rf"(?<!\w)(?:IMAGE\s*)?#({ids})(?!\w)", re.IGNORECASE)
        text = mention.sub(lambda m: f"Image {numbers[m.group(1)]}", text)
    text = text.replace(IMAGE_TAG, "")
    text = re.sub(r"[ \t]{2,}", " ", text)
    text = re.sub(r" +([,.;:?!])", r"\1", text)
    return text.strip()


def dialogue_to_conversation(messages: Any, image_dir: str) -> tuple[Conversation | None, str]:
    """One Sparkles dialogue as a Conversation, or (None, reason)."""
    if isinstance(messages, dict):
        messages = messages.get("dialogue")
    if not isinstance(messages, list) or not messages or len(messages) % 2:
        return None, "malformed"
    numbers: dict[str, int] = {}
    per_round: list[list[str]] = []
    for user, assistant in pairs(messages):
        if not (isinstance(user, dict) and isinstance(assistant, dict)
                and user.get("role") == "user" and assistant.get("role") == "assistant"
                and isinstance(user.get("content"), str) and isinstance(assistant.get("content"), str)):
            return None, "malformed"
        new = []
        for im in user.get("images") or []:
            iid = im.get("image_id") if isinstance(im, dict) else None
            if iid is None or str(iid) == "":
                return None, "malformed"
            iid = str(iid)
            if iid not in numbers:
                numbers[iid] = len(numbers) + 1
                new.append(os.path.join(image_dir, f"{iid}.jpg"))
        per_round.append(new)
    if not numbers:
        return None, "no_images"
    rounds = [Round(question=rewrite_image_refs(u["content"], numbers),
                    answer=rewrite_image_refs(a["content"], numbers), images=imgs)
              for (u, a), imgs in zip(pairs(messages), per_round)]
    return Conversation(rounds=rounds), ""


def load_sparkles_dialogue(data_path: str, *, subsets=SUBSETS, max_images: int | None = DEFAULT_MAX_IMAGES,
                           stats: dict | None = None) -> list[Conversation]:
    """SparklesDialogueCC and SparklesDialogueVG, images numbered in order of first appearance."""
    found, missing = [], []
    for s in subsets:
        try:
            found.append(subset_paths(data_path, s))
        except FileNotFoundError:
            missing.append(os.path.join(data_path, f"SparklesDialogue{s}", "annotations", f"SparklesDialogue{s}.json"))
    if missing:
        raise FileNotFoundError("sparkles_dialogue: missing data file(s): " + ", ".join(missing)
                                + " (download the folders from https://github.com/HYPJUDY/Sparkles)")
    st = LoadStats("sparkles_dialogue")
    out = []
    for ann, image_dir in found:
        require_dir(image_dir, what="sparkles_dialogue")
        data = read_json(ann)
        if not isinstance(data, list):
            raise ValueError(f"{ann}: expected a JSON list of dialogues, got {type(data).__name__}")
        for item in data:
            conv, why = dialogue_to_conversation(item, image_dir)
            if conv is None:
                st.skip(why)
                continue
            conv = limit_images(conv, max_images)
            if conv is None:
                st.skip("too_many_images")
                continue
            out.append(conv)
    return st.finish(out, stats)
