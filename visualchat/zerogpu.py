"""ZeroGPU: answering in a forked GPU worker that keeps nothing between calls.

``@spaces.GPU`` runs the decorated function in a forked worker and pickles its arguments and results,
so it cannot carry a session with a KV cache. On ZeroGPU (``SPACES_ZERO_GPU``) a served conversation
(:class:`visualchat.served.ServedConversation`) keeps its rounds as plain data and every answer replays
them here: :func:`history` turns the rounds into that data, and :func:`stream_conversation`, the only
decorated function, answers the last round on a model :func:`register` ed under a key. Off ZeroGPU
``spaces.GPU`` is not used.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence

from .session import Session

_MODELS: dict[str, Any] = {}  # model key -> VisualChat, read by stream_conversation (also in a forked worker)


def zero_gpu_active() -> bool:
    """True on a Hugging Face ZeroGPU Space (the ``spaces`` package importable and SPACES_ZERO_GPU set),
    or when VISUALCHAT_STATELESS=1 forces the same stateless replay path."""
    if os.environ.get("VISUALCHAT_STATELESS", "").lower() in ("1", "true", "yes"):
        return True
    if os.environ.get("SPACES_ZERO_GPU", "").lower() not in ("1", "t", "true"):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        return False
    return True


def gpu_decorator(duration: int | None = None) -> Callable[[Callable], Callable]:
    """``spaces.GPU(duration=...)`` when the ``spaces`` package is importable, else the identity."""
    try:
        import spaces
    except ImportError:
        return lambda fn: fn
    duration = duration or int(os.environ.get("VISUALCHAT_GPU_DURATION", "120"))
    return spaces.GPU(duration=duration)


def register(key: str, vc) -> None:
    """Make model ``vc`` answer :func:`stream_conversation` calls for ``key`` (a worker forked later sees it)."""
    _MODELS[key] = vc


def history(rounds: Sequence) -> list[dict]:
    """Conversation rounds (:class:`visualchat.template.Round`) as the plain data a replay takes."""
    return [{"question": r.question, "images": r.images, "answer": r.answer or ""} for r in rounds]


def stream_conversation(key: str, rounds: list[dict], question: str, images: Sequence, gen: dict) -> Iterator:
    """Answer ``question`` (with ``images``) after ``rounds`` (:func:`history`) on the registered model
    ``key``: a session built from the rounds, nothing kept. Only plain data in and text out, so
    ``spaces.GPU`` can run it in its forked worker. The last item is ``{"finish_reason": ...}``: why the
    answer ended."""
    session = Session.from_history(_MODELS[key], rounds)
    yield from session.stream(question, images, **gen)
    yield {"finish_reason": session.finish_reason}

