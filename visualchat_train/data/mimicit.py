"""MIMIC-IT (Otter) sets: ``otter_mimicit_cgd`` and ``otter_mimicit_{sd,sn,tvc,vst}``.

Published format (https://huggingface.co/datasets/pufanyi/MIMICIT, Otter's docs/mimicit_format.md),
for each set ``X``:

- ``X_instructions.json``::

      {"meta": {"version": ..., "time": ..., "author": ...},
       "data": {"X_INS_00001": {"instruction": "...", "answer": "...",
                                "image_ids": ["X_IMG_..", ...], "rel_ins_ids": ["X_INS_00002", ...]}, ...}}

- ``X.json``: ``{image_id: base64 string}`` — the images (SD, SN, TVC, VST; Otter later moved to
  parquet, which this loader does not read). It is never loaded whole: :mod:`visualchat_train.data.b64index`
  finds each image's string once (cached on disk), and the references are
  :class:`~visualchat_train.data.b64index.Base64Slice` objects that read their image when it is opened
  (``lazy_images=False`` gives ``"base64:<data>"`` strings instead, read the same way).

Layout under ``data_path``: the DeepSpeed-VisualChat README puts both files in ``MIMIC-IT/``; the
per-set folders of the Hugging Face repository (``MIMIC-IT/X/``, ``X/``) are accepted too. The
images file is looked for next to the instructions first.

Choices (each differs from or pins down the reference implementation):

- Grouping: instructions are taken in file order; each one not yet used opens a conversation and
  pulls in its ``rel_ins_ids`` (those present, unused and about the same ``image_ids``) as later
  rounds, in the listed order. The first round brings all the images; the reference shuffled the
  rounds, we keep them deterministic (shuffle samples in the trainer instead).
- CGD images are read from COCO like the reference (``coco/train2017/``, higher resolution than
  MIMIC-IT's copies): ``CGD_IMG_000000426149`` -> ``000000426149.jpg`` (the reference's
  ``image_id[8:] + ".jpg"``; we take the trailing digits and pad them to COCO's 12).
- Image i of a conversation is the i-th entry of the published ``image_ids`` (the reference fed
  multi-image samples in reverse order; see tests).
- More than ``max_images`` (8) images: by default spread evenly over the list, first and last
  kept, order unchanged (``overflow="subsample"``); ``"truncate"`` keeps the first 8, ``"skip"``
  drops the sample (what the reference's preprocessing did for SN, TVC and VST).
- An image id missing from ``X.json`` skips the whole sample (``on_missing_image="skip"``, the
  default: a question about two images must not be asked about one); ``"drop"`` leaves just
  that image out, as the reference did.
"""
from __future__ import annotations

import os
import re
from typing import Any

from visualchat.template import Conversation, Round

from ._common import (DEFAULT_MAX_IMAGES, LoadStats, even_subsample, find_first, limit_images, read_json, require_dir,
                      strip_marker)
from .b64index import Base64Slice, base64_index
from .llava import coco_dir

SETS = ("CGD", "SD", "SN", "TVC", "VST")


def _dirs(data_path: str, set_name: str) -> list[str]:
    return [os.path.join(data_path, "MIMIC-IT"), os.path.join(data_path, "MIMIC-IT", set_name),
            os.path.join(data_path, set_name), data_path]


def instructions_file(data_path: str, set_name: str) -> str:
    name = f"{set_name}_instructions.json"
    return find_first([os.path.join(d, name) for d in _dirs(data_path, set_name)], what=f"MIMIC-IT {set_name}")


def images_file(data_path: str, set_name: str, next_to: str) -> str:
    name = f"{set_name}.json"
    here = os.path.dirname(next_to)
    cands = [os.path.join(here, name)] + [os.path.join(d, name) for d in _dirs(data_path, set_name)
                                         if os.path.join(d, name) != os.path.join(here, name)]
    try:
        return find_first(cands, what=f"MIMIC-IT {set_name} images (JSON of image_id -> base64)")
    except FileNotFoundError as e:
        pq = os.path.join(here, f"{set_name}.parquet")
        if os.path.isfile(pq):
            raise FileNotFoundError(f"{e}; found {pq}, but this loader reads the JSON images file "
                                    "(convert the parquet's 'base64' column to {image_id: base64} JSON)") from None
        raise


def read_instructions(path: str, st: LoadStats) -> dict[str, dict]:
    """The ``data`` dict of an instructions file, keeping only well-formed entries."""
    raw = read_json(path)
    data = raw.get("data") if isinstance(raw, dict) else None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected {{\"meta\": ..., \"data\": {{id: instruction}}}}, found no 'data' object")
    out = {}
    for k, v in data.items():
        ok = (isinstance(v, dict) and isinstance(v.get("instruction"), str) and isinstance(v.get("answer"), str)
              and isinstance(v.get("image_ids"), list) and all(isinstance(i, str) for i in v["image_ids"]))
        if ok:
            out[k] = v
        else:
            st.skip("malformed_instruction")
    return out


def group_instructions(data: dict[str, dict]) -> list[list[str]]:
    """Each unused instruction with its related instructions (same images), in file order."""
    used: set[str] = set()
    groups = []
    for k, ins in data.items():
        if k in used:
            continue
        used.add(k)
        g = [k]
        for r in ins.get("rel_ins_ids") or []:
            if isinstance(r, str) and r in data and r not in used and data[r]["image_ids"] == ins["image_ids"]:
                used.add(r)
                g.append(r)
        groups.append(g)
    return groups


def group_rounds(data: dict[str, dict], group: list[str]) -> list[Round]:
    return [Round(question=strip_marker(data[k]["instruction"]), answer=data[k]["answer"].strip()) for k in group]


def cgd_image_file(image_id: str) -> str | None:
    """``CGD_IMG_000000426149`` -> ``000000426149.jpg`` (COCO train2017 name); None if no number."""
    m = re.search(r"(\d+)$", image_id)
    if not m:
        return None
    return f"{int(m.group(1)):012d}.jpg"


def _fit_images(ids: list[Any], max_images: int | None, overflow: str) -> list[Any] | None:
    if max_images is None or len(ids) <= max_images:
        return ids
    if overflow == "subsample":
        return even_subsample(ids, max_images)
    if overflow == "truncate":
        return ids[:max_images]
    if overflow == "skip":
        return None
    raise ValueError(f"overflow must be 'subsample', 'truncate' or 'skip', got {overflow!r}")


def cgd_groups(data_path: str, st: LoadStats) -> list[tuple[list[str], list[tuple[str, str]]]]:
    """CGD groups as (COCO file names in published order, [(question, answer), ...])."""
    data = read_instructions(instructions_file(data_path, "CGD"), st)
    out = []
    for g in group_instructions(data):
        files = [cgd_image_file(i) for i in data[g[0]]["image_ids"]]
        if not files or any(f is None for f in files):
            st.skip("bad_image_id")
            continue
        out.append((files, [(r.question, r.answer) for r in group_rounds(data, g)]))
    return out


def load_otter_mimicit_cgd(data_path: str, *, max_images: int | None = DEFAULT_MAX_IMAGES,
                           overflow: str = "subsample", stats: dict | None = None) -> list[Conversation]:
    """MIMIC-IT CGD with COCO 2017 train images; one conversation per instruction group."""
    images = coco_dir(data_path)
    st = LoadStats("otter_mimicit_cgd")
    groups = cgd_groups(data_path, st)
    require_dir(images, what="otter_mimicit_cgd (COCO 2017 train images)")
    out = []
    for files, qa in groups:
        files = _fit_images(files, max_images, overflow)
        if files is None:
            st.skip("too_many_images")
            continue
        rounds = [Round(question=q, answer=a) for q, a in qa]
        rounds[0].images = [os.path.join(images, f) for f in files]
        out.append(Conversation(rounds=rounds))
    return st.finish(out, stats)


def load_mimicit_base64(set_name: str, data_path: str, *, max_images: int | None = DEFAULT_MAX_IMAGES,
                        overflow: str = "subsample", on_missing_image: str = "skip", lazy_images: bool = True,
                        stats: dict | None = None) -> list[Conversation]:
    """A MIMIC-IT set whose images are base64 strings in ``<SET>.json``; references are
    :class:`Base64Slice` (or ``base64:<data>`` strings with ``lazy_images=False``)."""
    if on_missing_image not in ("skip", "drop"):
        raise ValueError(f"on_missing_image must be 'skip' or 'drop', got {on_missing_image!r}")
    name = f"otter_mimicit_{set_name.lower()}"
    st = LoadStats(name)
    ins_path = instructions_file(data_path, set_name)
    img_path = images_file(data_path, set_name, ins_path)
    data = read_instructions(ins_path, st)
    index = base64_index(img_path)
    refs: dict[str, Any] = {}  # one reference per image, shared by every round that shows it

    def ref(image_id: str) -> Any:
        if image_id not in refs:
            where = index.get(image_id)
            if where is None or where[1] == 0:
                return None
            sl = Base64Slice(img_path, where[0], where[1], image_id)
            refs[image_id] = sl if lazy_images else sl.image_ref()
        return refs[image_id]

    out = []
    for g in group_instructions(data):
        ids = list(data[g[0]]["image_ids"])
        got = [(i, ref(i)) for i in ids]
        if any(r is None for _, r in got):
            if on_missing_image == "skip":
                st.skip("missing_image")
                continue
            got = [(i, r) for i, r in got if r is not None]
        if not got:
            st.skip("no_images")
            continue
        fitted = _fit_images([r for _, r in got], max_images, overflow)
        if fitted is None:
            st.skip("too_many_images")
            continue
        rounds = group_rounds(data, g)
        rounds[0].images = fitted
        conv = limit_images(Conversation(rounds=rounds), max_images)
        if conv is None:
            st.skip("too_many_images")
            continue
        out.append(conv)
    return st.finish(out, stats)


def load_otter_mimicit_sd(data_path: str, **opts) -> list[Conversation]:
    """MIMIC-IT SD (spot the difference), base64 images from SD.json."""
    return load_mimicit_base64("SD", data_path, **opts)


def load_otter_mimicit_sn(data_path: str, **opts) -> list[Conversation]:
    """MIMIC-IT SN (ScanNet scene frames), base64 images from SN.json."""
    return load_mimicit_base64("SN", data_path, **opts)


def load_otter_mimicit_tvc(data_path: str, **opts) -> list[Conversation]:
    """MIMIC-IT TVC (TV show clips), base64 frames from TVC.json."""
    return load_mimicit_base64("TVC", data_path, **opts)


def load_otter_mimicit_vst(data_path: str, **opts) -> list[Conversation]:
    """MIMIC-IT VST (visual story telling), base64 images from VST.json."""
    return load_mimicit_base64("VST", data_path, **opts)
