"""A browser tab's conversation with one served model (:class:`ChatSession`), independent of any UI
toolkit: the server's limits, one answer at a time, status and stats, display copies of the images,
and the KV-cache budget across tabs. It drives a :class:`~visualchat.session.Session`; on ZeroGPU
(``Server.stateless``) every answer replays the conversation through ``Server._remote``."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .generation import GenerationConfig
from .images import open_image
from .serving import Server, check_fits, check_generation, check_text
from .session import check_question
from .template import Conversation, Round

log = logging.getLogger("visualchat.serving")

DISPLAY_MAX_SIDE = 1024  # the chat shows a copy of each image at most this large (the model sees the original)


def cache_bytes(cache) -> int:
    """Memory held by a transformers KV cache (each storage counted once)."""
    if cache is None:
        return 0
    seen, total = set(), 0
    for layer in getattr(cache, "layers", None) or ():
        for t in vars(layer).values():
            if torch.is_tensor(t) and t.numel():
                st = t.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
    return total


# ---------------------------------------------------------------------------------------------------
# One conversation of one browser tab


@dataclass
class ChatRound:
    """What the UI shows of a round: the question, the display copies of its images, the answer."""

    question: str
    paths: list[str]
    answer: str | None
    first_image: int  # the conversation-wide number of its first image (1-based)


class ChatSession:
    """A browser tab's conversation with one model; no UI in here. Sessions keep their KV cache
    (or, on ZeroGPU, replay the conversation). Bad input raises before anything changes, with the
    message for the user (:data:`INPUT_ERRORS`). Generators keep a partial answer when closed early."""

    def __init__(self, server: Server, name: str = "chat"):
        self.server, self.name = server, name
        self.vc = server.models[name]
        self._session = None if server.stateless else self.vc.new_session()
        self._conv = Conversation(system=self.vc.config.system)  # the stateless path's conversation
        self._paths: list[list[str]] = []
        self._busy = threading.Lock()
        self.status = "idle"  # idle | generating | done | stopped | failed
        self.error: str | None = None
        self.partial = ""  # the answer so far while generating
        self.last_stats: dict = {}
        self.last_used = 0.0  # time.monotonic() of the last answer's end (the KV-cache budget drops the oldest)
        server.register_chat(self)

    # -- views ---------------------------------------------------------------------------------
    @property
    def conversation(self) -> Conversation:
        return self._conv if self._session is None else self._session.conversation

    @property
    def rounds(self) -> list[ChatRound]:
        out, n = [], 1
        for rnd, paths in zip(self.conversation.rounds, self._paths):
            out.append(ChatRound(rnd.question, list(paths), rnd.answer, n))
            n += len(rnd.images)
        if out and out[-1].answer is None and self.status == "generating":
            out[-1].answer = self.partial if self.partial.strip() else None  # None: nothing to show yet
        return out

    @property
    def image_paths(self) -> list[str]:
        return [p for ps in self._paths for p in ps]

    def prompt_text(self) -> str:
        if self._session is not None:
            return self._session.prompt_text()
        return self.vc.template.render_text(self._conv)

    def cache_bytes(self) -> int:
        """Bytes of this tab's KV cache (0 when it has none)."""
        return cache_bytes(getattr(self._session, "_cache", None))

    def drop_cache(self, blocking: bool = True) -> bool:
        """Free the KV cache (the next round rebuilds it). False when busy and not ``blocking``."""
        if not self._busy.acquire(blocking=blocking):
            return False
        try:
            if self._session is not None:
                self._session.drop_cache()
            return True
        finally:
            self._busy.release()

    def _check(self, gen: dict, question: str | None = None) -> dict:
        """The server's limits on one request, before anything is decoded or run."""
        limits = self.server.limits
        if question is not None and isinstance(question, str):
            check_text(question, "the question", limits.max_question_chars)
        return check_generation(gen, limits)

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no answer is being generated (e.g. after a cancelled request's cleanup)."""
        if self._busy.acquire(timeout=timeout):
            self._busy.release()
            return True
        return False

    # -- changes -------------------------------------------------------------------------------
    def send(self, question: str, images: Sequence = (), **gen) -> Iterator[str]:
        """Add a round and return its answer's generator. Raises on bad input, changing nothing."""
        gen = self._check(gen, question)
        with self._exclusive():
            if self._session is not None:
                stream = self._session.stream(question, images, **gen)
            else:
                q = check_question(question)
                GenerationConfig(**gen)
                opened = [open_image(im) for im in images]
                self._close_open_round()
                self._conv.rounds.append(Round(q, opened))
                try:
                    check_fits(self.vc, self._conv)
                except BaseException:
                    self._conv.rounds.pop()
                    raise
                stream = self._replay(gen, new_round=True)
            self._paths.append([self._save(im) for im in self.conversation.rounds[-1].images])
        return self._run(stream)

    def regenerate(self, **gen) -> Iterator[str]:
        gen = self._check(gen)
        with self._exclusive():
            if not self.conversation.rounds:
                raise ValueError("there is no answer to regenerate yet")
            if self._session is not None:
                stream = self._session.regenerate(**gen)
            else:
                GenerationConfig(**gen)
                self._conv.rounds[-1].answer = None
                stream = self._replay(gen, new_round=False)
        return self._run(stream)

    def undo(self) -> ChatRound | None:
        with self._exclusive():
            rounds = self.rounds
            if not rounds:
                return None
            if self._session is not None:
                self._session.undo()
            else:
                self._conv.rounds.pop()
            for p in self._paths.pop():
                _remove(p)
            self.status, self.error = "idle", None
            return rounds[-1]

    def reset(self) -> None:
        with self._exclusive():
            if self._session is not None:
                self._session.reset()
            self._conv = Conversation(system=self.vc.config.system)
            for p in self.image_paths:
                _remove(p)
            self._paths = []
            self.status, self.error, self.last_stats = "idle", None, {}

    def attention_maps(self):
        """Where the last answer looked (:meth:`visualchat.session.Session.attention_maps`): one extra
        forward, after any running answer. On the stateless path the conversation is rebuilt in a
        fresh session for it."""
        with self._exclusive():
            session = self._session
            if session is None:
                rounds = self._conv.rounds
                if not rounds or rounds[-1].answer is None:
                    raise ValueError("there is no answer yet to show where it looked; ask something first")
                session = self.vc.new_session(self._conv.system)
                for r in rounds:
                    session.add_round(r.question, r.images, r.answer)
            return session.attention_maps()

    def close(self) -> None:
        """Free the KV cache and the display copies (the tab is gone)."""
        with contextlib.suppress(Exception):
            self.reset()
        self._session = None

    # -- internals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _exclusive(self, timeout: float = 60.0):
        if not self._busy.acquire(timeout=timeout):
            raise RuntimeError("this chat is still busy with the previous answer; press Stop first")
        try:
            yield
        finally:
            self._busy.release()

    def _close_open_round(self) -> None:
        if self._conv.rounds and self._conv.rounds[-1].answer is None:
            self._conv.rounds[-1].answer = ""

    def _replay(self, gen: dict, new_round: bool) -> Iterator[str]:
        rounds = self._conv.rounds
        rnd = rounds[-1]
        hist = [{"question": r.question, "images": r.images, "answer": r.answer or ""} for r in rounds[:-1]]
        stream = self.server._remote(self.server.key(self.name), hist, rnd.question, rnd.images, dict(gen))

        def pieces():
            text = []
            try:
                for piece in stream:
                    text.append(piece)
                    rnd.answer = "".join(text) if "".join(text).strip() else None
                    yield piece
            except Exception:
                if new_round and not text and rounds and rounds[-1] is rnd:  # failed before its first token: drop the round,
                    rounds.pop()                               # as a stateful session does
                raise
            finally:
                rnd.answer = "".join(text).strip()
                close = getattr(stream, "close", None)
                if close:
                    close()
        return pieces()

    def _run(self, stream: Iterator[str]) -> Iterator[str]:
        """Wrap an answer generator: hold the busy lock while it runs, record status and stats, keep
        the conversation and the display copies in step when the model fails."""
        import time

        limit = self.server.limits.answer_seconds

        def run():
            self._busy.acquire()
            self.status, self.error, self.partial = "generating", None, ""
            finished = False
            deadline = time.monotonic() + limit
            try:
                for piece in stream:
                    self.partial += piece
                    yield piece
                    if time.monotonic() > deadline:  # checked between tokens; the answer so far is kept
                        log.warning("an answer reached the time limit of %g s per answer and was stopped", limit)
                        self.status = "stopped"
                        self.error = f"the answer reached {limit:g} s, this server's limit per answer (--answer-seconds)"
                        break
                else:
                    finished = True
            except GeneratorExit:
                self.status = "stopped"
                raise
            except Exception as e:
                self.status, self.error = "failed", f"{type(e).__name__}: {e}"
                log.exception("generation failed")
                if self._session is not None:
                    self._session.drop_cache()  # a forward that failed half-way may have left it inconsistent
                raise
            finally:
                if hasattr(stream, "close"):
                    stream.close()  # a stopped answer keeps its partial text
                if finished:
                    self.status = "done"
                elif self.status == "generating":
                    self.status = "stopped"
                if self._session is not None:
                    self.last_stats = dict(self._session.last_stats)
                n = len(self.conversation.rounds)
                for ps in self._paths[n:]:  # the model failed before the round was kept
                    for p in ps:
                        _remove(p)
                del self._paths[n:]
                self.last_used = time.monotonic()
                self._busy.release()
                if self._session is not None:
                    self.server.enforce_kv_budget(keep=self)
        return run()

    def _save(self, im) -> str:
        """A display copy of an image in the server's temp folder (which Gradio may serve)."""
        from PIL import Image

        im = im.copy()
        if max(im.size) > DISPLAY_MAX_SIDE:
            im.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
        path = os.path.join(self.server.tmpdir, f"{uuid.uuid4().hex}.png")
        im.save(path, format="PNG", compress_level=1)
        return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)
