"""Images embedded as base64 in a big ``{image_id: "<base64>"}`` JSON file (MIMIC-IT's ``SD.json``,
``SN.json``, ``TVC.json``, ``VST.json``, gigabytes each), read without holding the file in memory.

:func:`base64_index` scans the file once through ``mmap`` (C-speed ``find``, no JSON parse, no copy) and
records where each image's string lies; the index is cached on disk (``~/.cache/visualchat/b64index/``,
keyed by the file's path, size and mtime), so every later run, and every other rank on the node,
reads it instead of scanning. A :class:`Base64Slice` is the image reference a loader hands out: a
(path, offset, length) triple that reads its few kilobytes when the image is opened.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import dataclass

INDEX_VERSION = 1


@dataclass(frozen=True)
class Base64Slice:
    """One image inside a base64 JSON file: ``length`` bytes of its string value at ``offset``."""
    path: str
    offset: int
    length: int
    image_id: str = ""

    def data(self) -> str:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            raw = f.read(self.length)
        text = raw.decode("ascii", errors="replace")
        if "\\" in text:  # a JSON writer may escape "/" as "\/"
            text = json.loads(f'"{text}"')
        if text.startswith("data:") and "," in text:  # tolerate a data URI
            text = text.split(",", 1)[1]
        return text

    def image_ref(self) -> str:
        """The ``base64:<data>`` reference :func:`visualchat.images.open_image` reads."""
        return "base64:" + self.data()

    def cache_key(self) -> str:
        st = os.stat(self.path)
        return hashlib.sha1(f"{os.path.abspath(self.path)}|{st.st_size}|{st.st_mtime_ns}|{self.offset}|"
                            f"{self.length}".encode()).hexdigest()

    def __str__(self) -> str:
        return f"{self.image_id or 'image'} in {self.path} ({self.length:,} base64 chars)"


def _string_end(buf, start: int) -> int:
    """Index of the quote closing the JSON string whose first character is at ``start``."""
    i = start
    while True:
        q = buf.find(b'"', i)
        if q < 0:
            raise ValueError("unterminated string")
        n = 0
        while q - 1 - n >= start and buf[q - 1 - n] == 0x5C:  # count backslashes before the quote
            n += 1
        if n % 2 == 0:
            return q
        i = q + 1


def _skip_ws(buf, i: int) -> int:
    n = len(buf)
    while i < n and buf[i] in b" \t\r\n":
        i += 1
    return i


def scan(path: str) -> dict[str, tuple[int, int] | None]:
    """image_id -> (offset, length) of its string value (None for a non-string value, e.g. null)."""
    out: dict[str, tuple[int, int] | None] = {}
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path}: empty file, expected a JSON object {{image_id: base64}}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            i = _skip_ws(buf, 0)
            if buf[i:i + 1] != b"{":
                raise ValueError(f"{path}: expected a JSON object {{image_id: base64}}")
            i = _skip_ws(buf, i + 1)
            if buf[i:i + 1] == b"}":
                return out
            while True:
                try:
                    if buf[i:i + 1] != b'"':
                        raise ValueError(f"expected a key at byte {i}")
                    k_end = _string_end(buf, i + 1)
                    key = json.loads(buf[i:k_end + 1].decode("utf-8"))
                    i = _skip_ws(buf, k_end + 1)
                    if buf[i:i + 1] != b":":
                        raise ValueError(f"expected ':' at byte {i}")
                    i = _skip_ws(buf, i + 1)
                    if buf[i:i + 1] == b'"':
                        v_end = _string_end(buf, i + 1)
                        out[key] = (i + 1, v_end - i - 1)
                        i = v_end + 1
                    elif buf[i:i + 1] in (b"{", b"["):
                        raise ValueError(f"the value of {key!r} is not a string")
                    else:  # a scalar (null, a number): no image
                        j = i
                        while j < len(buf) and buf[j] not in b",}":
                            j += 1
                        out[key] = None
                        i = j
                    i = _skip_ws(buf, i)
                    c = buf[i:i + 1]
                    if c == b",":
                        i = _skip_ws(buf, i + 1)
                        continue
                    if c == b"}":
                        return out
                    raise ValueError(f"expected ',' or '}}' at byte {i}")
                except ValueError as e:
                    raise ValueError(f"{path}: not a JSON object of image_id -> base64 string: {e}") from None


def index_path(path: str) -> str:
    from visualchat.assets import cache_dir

    st = os.stat(path)
    h = hashlib.sha1(f"{INDEX_VERSION}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return os.path.join(cache_dir(), "b64index", f"{os.path.basename(path)}-{h[:16]}.json")


def base64_index(path: str, use_cache: bool = True) -> dict[str, tuple[int, int] | None]:
    """:func:`scan` of ``path``, through the on-disk cache (written atomically: ranks may race)."""
    cached = index_path(path) if use_cache else None
    if cached and os.path.isfile(cached):
        try:
            with open(cached) as f:
                return {k: (tuple(v) if v is not None else None) for k, v in json.load(f).items()}
        except (OSError, ValueError):
            pass  # a damaged cache file: scan again
    idx = scan(path)
    if cached:
        try:
            os.makedirs(os.path.dirname(cached), exist_ok=True)
            tmp = f"{cached}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(idx, f)
            os.replace(tmp, cached)
        except OSError:
            pass  # a read-only cache: the scan is still right
    return idx
