"""The server's limits on one request's cost, and the one reader of their environment variables.

Each limit is a field of :class:`Limits` with its default, its variable (:data:`ENV`), its help text and
the ``app.py`` flag that sets it (:mod:`visualchat.flags` builds the flags from the fields);
:meth:`Limits.from_env` is the only code that reads those variables (``tests/test_import_graph.py``
checks that no other module does). ``app.py`` takes its limit flags' defaults from it,
:mod:`visualchat.images` its image limits, and the server its :class:`Limits` when it is given none. The
checks of a request against them are :meth:`visualchat.session.Session.prepare_round`'s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

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


_SECONDS = ("answer_seconds", "unread_seconds")


def _limit(default, env: str, help: str, flag: str | None = None, parse=None):
    """A limit's field: its default, its environment variable, its help text, the ``app.py`` flag that sets
    it (if one does) and how a value given as text is read (sizes: :func:`parse_size`)."""
    meta = {"env": env, "help": help}
    if flag:
        meta["flags"] = (flag,)
    if parse:
        meta["parse"] = parse
    return field(default=default, metadata=meta)


@dataclass
class Limits:
    """The server's bounds on one request's cost, checked before any decoding or model work (flags and
    environment variables of ``app.py``: docs/app-and-api.md lists them)."""

    max_new_tokens: int = _limit(1024, "VISUALCHAT_MAX_NEW_TOKENS_LIMIT", "largest max_new_tokens a request may ask "
                                 "for; more is refused with a message", "--max-new-tokens-limit")
    max_question_chars: int = _limit(4000, "VISUALCHAT_MAX_QUESTION_CHARS", "longest question, in characters (an "
                                     "API round's earlier answer: 4x this)", "--max-question-chars")
    max_image_bytes: int = _limit(25_000_000, "VISUALCHAT_MAX_FILE_SIZE", "largest upload Gradio accepts, and the "
                                  "largest data:/base64 image /generate decodes (refused by its length first)",
                                  "--max-file-size", parse_size)
    answer_seconds: float = _limit(120.0, "VISUALCHAT_ANSWER_SECONDS", "wall-clock limit per answer, checked "
                                   "between tokens: the answer so far is kept", "--answer-seconds")
    unread_seconds: float = _limit(15.0, "VISUALCHAT_UNREAD_SECONDS", "an API answer whose output nobody reads for "
                                   "this long (a POST to /gradio_api/call/generate never fetched) is stopped",
                                   "--unread-seconds")
    kv_cache_budget: int = _limit(2_000_000_000, "VISUALCHAT_KV_CACHE_BUDGET", "all tabs' KV caches together; "
                                  "beyond it the least recently used tabs drop theirs and rebuild it on their next "
                                  "round", "--kv-cache-budget", parse_size)
    max_request_bytes: int = _limit(64_000_000, "VISUALCHAT_MAX_REQUEST_SIZE", "largest API request body (inline "
                                    "base64 images included) read at all; larger ones get HTTP 413 before they "
                                    "are parsed", "--max-request-size", parse_size)
    max_pixels: int = _limit(40_000_000, "VISUALCHAT_MAX_PIXELS", "largest image accepted, in pixels; a larger one "
                             "may be a decompression bomb")
    max_side: int = _limit(16_384, "VISUALCHAT_MAX_SIDE", "longest image side, in pixels")
    max_aspect: int = _limit(64, "VISUALCHAT_MAX_ASPECT", "longest to shortest image side")

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
        for f in fields(cls):
            v = os.environ.get(f.metadata["env"])
            if v in (None, ""):
                continue
            convert = f.metadata.get("parse") or (float if f.name in _SECONDS else int)
            try:
                kw[f.name] = convert(v)
            except ValueError as e:
                raise ValueError(f"environment variable {f.metadata['env']}={v!r}: {e}") from None
        try:
            return cls(**kw)
        except ValueError as e:
            name = str(e).split()[1]  # "limit NAME must be ..."
            raise ValueError(f"environment variable {ENV[name]}={os.environ[ENV[name]]!r}: {e}") from None


#: the environment variable of each limit
ENV = {f.name: f.metadata["env"] for f in fields(Limits)}
