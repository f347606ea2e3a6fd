"""The server's limits on one request's cost, and the one reader of their environment variables.

Each limit is a field of :class:`Limits` with its default, and :data:`ENV` names its variable;
:meth:`Limits.from_env` is the only code that reads those variables (``tests/test_import_graph.py``
checks that no other module does). ``app.py`` takes its limit flags' defaults from it,
:mod:`visualchat.images` its image limits, and the server its :class:`Limits` when it is given none.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields

_SIZE_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3, "kib": 1024, "mib": 1024 ** 2,
               "gib": 1024 ** 3}


def parse_size(value, what: str = "size") -> int:
    """Bytes from an int or a string like ``25mb``, ``500kb``, ``2gb`` (decimal units, as Gradio's
    ``max_file_size``) or ``1GiB``."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be a size like 25mb or a number of bytes, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower().replace(" ", "")
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):]
        try:
            n = int(float(num) * _SIZE_UNITS[unit])
        except (KeyError, ValueError):
            raise ValueError(f"{what} must be a size like 25mb, 500kb, 2gb or a number of bytes, got {value!r}") from None
    if n < 1:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


#: the environment variable of each limit
ENV = {
    "max_new_tokens": "VISUALCHAT_MAX_NEW_TOKENS_LIMIT",
    "max_question_chars": "VISUALCHAT_MAX_QUESTION_CHARS",
    "max_image_bytes": "VISUALCHAT_MAX_FILE_SIZE",
    "answer_seconds": "VISUALCHAT_ANSWER_SECONDS",
    "unread_seconds": "VISUALCHAT_UNREAD_SECONDS",
    "kv_cache_budget": "VISUALCHAT_KV_CACHE_BUDGET",
    "max_request_bytes": "VISUALCHAT_MAX_REQUEST_SIZE",
    "max_pixels": "VISUALCHAT_MAX_PIXELS",
    "max_side": "VISUALCHAT_MAX_SIDE",
    "max_aspect": "VISUALCHAT_MAX_ASPECT",
}
_SIZES = ("max_image_bytes", "kv_cache_budget", "max_request_bytes")  # read with parse_size: 25mb, 2gb, ...
_SECONDS = ("answer_seconds", "unread_seconds")


@dataclass
class Limits:
    """The server's bounds on one request's cost, checked before any decoding or model work (flags and
    environment variables of ``app.py``: docs/app-and-api.md lists them)."""

    max_new_tokens: int = 1024  # a larger max_new_tokens is refused
    max_question_chars: int = 4000  # a question's length (earlier answers: 4x this)
    max_image_bytes: int = 25_000_000  # an upload; also caps data:/base64 images before decoding
    answer_seconds: float = 120.0  # an answer stops generating after this long
    unread_seconds: float = 15.0  # an API answer nobody reads stops after this long
    kv_cache_budget: int = 2_000_000_000  # all tabs' KV caches together, bytes
    max_request_bytes: int = 64_000_000  # an API request's body (uploads: max_image_bytes)
    max_pixels: int = 40_000_000  # an image's pixel count (a larger one may be a decompression bomb)
    max_side: int = 16_384  # an image's longer side, in pixels
    max_aspect: int = 64  # an image's longer side over its shorter one

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _SECONDS:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v != v or v == float("inf"):
                    raise ValueError(f"limit {f.name} must be a positive number of seconds, got {v!r}")
            elif isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"limit {f.name} must be a positive whole number, got {v!r}")

    @property
    def max_answer_chars(self) -> int:
        return 4 * self.max_question_chars

    @classmethod
    def from_env(cls) -> "Limits":
        """The defaults, each replaced by its environment variable (:data:`ENV`) where that is set."""
        kw = {}
        for name, var in ENV.items():
            v = os.environ.get(var)
            if v in (None, ""):
                continue
            convert = parse_size if name in _SIZES else float if name in _SECONDS else int
            try:
                kw[name] = convert(v)
            except ValueError as e:
                raise ValueError(f"environment variable {var}={v!r}: {e}") from None
        try:
            return cls(**kw)
        except ValueError as e:
            name = str(e).split()[1]  # "limit NAME must be ..."
            raise ValueError(f"environment variable {ENV[name]}={os.environ[ENV[name]]!r}: {e}") from None
