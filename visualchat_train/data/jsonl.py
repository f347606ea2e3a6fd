"""``jsonl``: our own simple format, one conversation per line::

    {"system": "optional system prompt",
     "rounds": [{"images": ["cat.jpg", "/abs/dog.png"], "question": "...", "answer": "..."}, ...]}

``images`` may be left out (no image in that round). Relative image paths are taken from the
.jsonl file's folder; absolute paths and ``base64:<data>`` strings are kept as they are.
``data_path`` is a .jsonl file, or a folder: then every ``*.jsonl`` in it, in name order. Blank lines
are ignored; any other malformed line raises ValueError naming the file and line number, or, with
``skip_bad_lines=True`` (``--skip_bad_lines``), is logged with its file, line number and fault, left
out and counted (``stats["bad_lines"]``; the first few ``file:line`` are kept in ``bad_line_list``).
"""
from __future__ import annotations

import glob
import json
import logging
import os
from typing import Any

from visualchat.template import DEFAULT_SYSTEM, Conversation, Round

from ._common import DEFAULT_MAX_IMAGES, LoadStats, limit_images

log = logging.getLogger("visualchat_train.data.jsonl")

#: How many bad lines are named one by one in the log and in ``stats["bad_line_list"]``.
BAD_LINES_NAMED = 20


def jsonl_files(data_path: str) -> list[str]:
    if os.path.isfile(data_path):
        return [data_path]
    if os.path.isdir(data_path):
        files = sorted(glob.glob(os.path.join(data_path, "*.jsonl")))
        if files:
            return files
        raise FileNotFoundError(f"jsonl: no .jsonl file in {data_path} (expected {os.path.join(data_path, '*.jsonl')})")
    raise FileNotFoundError(f"jsonl: missing data file: {data_path} (give a .jsonl file or a folder holding one)")


def _image_ref(src: Any, base: str, where: str) -> str:
    if not isinstance(src, str) or not src:
        raise ValueError(f"{where}: each image must be a non-empty string (a path or 'base64:...'), got {src!r}")
    if src.startswith("base64:") or os.path.isabs(src):
        return src
    return os.path.normpath(os.path.join(base, src))


def parse_line(line: str, base: str, where: str) -> Conversation:
    """One line as a Conversation; ValueError with ``where`` (``file:line``) on any fault."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON (column {e.colno}): {e.msg}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with 'rounds', got {type(obj).__name__}")
    system = obj.get("system", DEFAULT_SYSTEM)
    if system is None:
        system = DEFAULT_SYSTEM
    if not isinstance(system, str):
        raise ValueError(f"{where}: 'system' must be a string")
    rounds_in = obj.get("rounds")
    if not isinstance(rounds_in, list) or not rounds_in:
        raise ValueError(f"{where}: 'rounds' must be a non-empty list")
    rounds = []
    for i, r in enumerate(rounds_in, 1):
        at = f"{where}: round {i}"
        if not isinstance(r, dict):
            raise ValueError(f"{at}: expected an object with 'question' and 'answer'")
        q, a = r.get("question"), r.get("answer")
        if not isinstance(q, str) or not q.strip():
            raise ValueError(f"{at}: 'question' must be a non-empty string")
        if not isinstance(a, str):
            raise ValueError(f"{at}: 'answer' must be a string (every training round needs one)")
        imgs = r.get("images", [])
        if imgs is None:
            imgs = []
        if not isinstance(imgs, list):
            raise ValueError(f"{at}: 'images' must be a list")
        rounds.append(Round(question=q, answer=a, images=[_image_ref(s, base, at) for s in imgs]))
    return Conversation(rounds=rounds, system=system)


def load_jsonl(data_path: str, *, max_images: int | None = DEFAULT_MAX_IMAGES, skip_bad_lines: bool = False,
               stats: dict | None = None) -> list[Conversation]:
    st = LoadStats("jsonl")
    out = []
    bad: list[str] = []
    for path in jsonl_files(data_path):
        base = os.path.dirname(os.path.abspath(path))
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    try:
                        line = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise ValueError(f"{path}:{n}: not UTF-8 text (byte {e.start})") from None
                    parsed = parse_line(line, base, f"{path}:{n}")
                except ValueError as e:
                    if not skip_bad_lines:
                        raise
                    st.skip("bad_line")
                    if len(bad) < BAD_LINES_NAMED:
                        bad.append(f"{path}:{n}")
                        log.warning("skipping bad line %s", e)
                    continue
                conv = limit_images(parsed, max_images)
                if conv is None:
                    st.skip("too_many_images")
                    continue
                out.append(conv)
    if st.skipped["bad_line"] > len(bad):
        log.warning("jsonl: %d bad lines skipped in all (the first %d named above)", st.skipped["bad_line"], len(bad))
    out = st.finish(out, stats)
    if stats is not None and bad:
        stats["bad_line_list"] = bad
    return out
