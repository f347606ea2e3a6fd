"""Refused requests, said once: the server's log gets ONE line at INFO per refusal (the route, a short
request id, the reason, and the operator's setting behind a limit when there is one), the traceback only
at DEBUG; the user's message says what is wrong and what to do, and never holds a server path, an
environment variable or an exception class (operators find their settings in the README and in the log
line)."""
from __future__ import annotations

import logging
import uuid

log = logging.getLogger("visualchat.app")


def request_id() -> str:
    """A short id that ties a user's refusal to its log line."""
    return uuid.uuid4().hex[:8]


def log_refusal(route: str, error: BaseException | str, knob: str | None = None, rid: str | None = None) -> str:
    """Log the refusal of a request on ``route`` in one line; ``knob`` (default: the error's ``knob``,
    see :class:`visualchat.images.ImageError`) names the operator's setting. Returns the request id."""
    rid = rid or request_id()
    knob = knob or getattr(error, "knob", None)
    log.info("refused %s [%s]: %s%s", route, rid, error, f" (operator setting: {knob})" if knob else "")
    if isinstance(error, BaseException) and log.isEnabledFor(logging.DEBUG):
        log.debug("refused %s [%s]: traceback", route, rid, exc_info=error)
    return rid
