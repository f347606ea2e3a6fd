"""The conversation engine: a conversation's state (rounds, images, the KV cache); ask, stream, undo,
regenerate. Every way of talking to a model drives a :class:`Session`: a served conversation
(:class:`visualchat.served.ServedConversation`: a browser tab's, or a ``/generate`` request's built from
its history), the ZeroGPU replay (:func:`visualchat.zerogpu.stream_conversation`), the CLI chat
(:mod:`visualchat.chat`) and the eval runner (``visualchat_train.eval``).

A round is checked in one place, :meth:`Session.prepare_round`, before anything changes: the question,
the generation settings, the images opened, their count, and whether the conversation with it fits
the context window; a server passes its :class:`~visualchat.limits.Limits` in. Everything that adds or
redoes a round goes through it.

The session keeps the LM's KV cache between rounds (a prefix cache). Every token of the rendered
conversation has a key (its id, or ``(image uid, row)`` for an image slot); before each forward the
cache is cropped to the longest prefix whose keys still match and only the rest is fed. So round k
encodes only its own new images and question; Undo and Regenerate crop the cache and recompute
nothing that is still valid. Images are run through the encoder once, at the first forward after they
arrive (so a session that only holds a conversation, e.g. to check it, never runs the model).
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .generation import GenerationConfig, TextStreamer, sample_stream
from .images import ImageError, open_image
from .limits import Limits
from .template import Conversation, Rendered, Round


class ContextWindowError(ValueError):
    """The conversation does not fit the model's context window."""


class TooManyImagesError(ValueError):
    """More images than the model is configured for."""


def check_text(value, field: str, limit: int | None = None, required: bool = True) -> str:
    """A question or answer: a string of valid Unicode (no lone surrogates), at most ``limit`` characters
    (None: no limit); ``None`` is ``""`` when not ``required``. Else a ValueError naming ``field``."""
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        got = "null" if value is None else type(value).__name__
        raise ValueError(f"{field} must be text{'' if required else ' or null'}, got {got}")
    for i, ch in enumerate(value):
        if "\ud800" <= ch <= "\udfff":
            raise ValueError(f"{field} contains a lone surrogate (U+{ord(ch):04X}) at character {i + 1}; "
                             "send valid Unicode text")
    if limit is not None and len(value) > limit:
        raise ValueError(f"{field} is {len(value):,} characters long; this server accepts at most {limit:,}")
    return value


def check_question(question, limits: Limits | None = None, field: str = "the question") -> str:
    """The stripped question: text (:func:`check_text`, at most ``limits.max_question_chars``), not empty."""
    question = check_text(question, field, limits.max_question_chars if limits else None)
    if not question.strip():
        raise ValueError(f"{field} is empty")
    return question.strip()


def check_image_count(total: int, limit: int) -> None:
    if total > limit:
        raise TooManyImagesError(f"this conversation would have {total} images; the model allows at most {limit}")


def check_context(r: Rendered, ctx: int) -> None:
    """ContextWindowError, naming the numbers, when rendered tokens leave no room to generate."""
    if len(r) >= ctx:
        raise ContextWindowError(
            f"the conversation needs {len(r)} tokens ({sum(r.is_image)} of them image tokens) but the "
            f"context window is {ctx} tokens; undo or clear earlier rounds, or start a new chat")


#: The errors that mean "the user's input is not acceptable"; their message is for the user.
INPUT_ERRORS = (ImageError, TooManyImagesError, ContextWindowError, ValueError)

_uids = itertools.count()
#: Why an answer ended: the model ended it (EOS or the next template section), the token cap (max_new_tokens
#: or the context window), Stop (the stream was closed), the server's time limit per answer, or the request
#: was refused before anything ran. A Session sets the first three; its callers the others.
FINISH_REASONS = ("stop", "length", "stopped", "timeout", "refused")


class Answer(str):
    """An answer's text (a ``str``) that also says why it ended (``finish_reason``, :data:`FINISH_REASONS`)."""

    finish_reason: str | None

    def __new__(cls, text: str, finish_reason: str | None = None):
        out = super().__new__(cls, text)
        out.finish_reason = finish_reason
        return out

#: Generation stops when the answer starts a new template section (``\n### ``), which an
#: undertrained model does instead of ending with EOS; the marker is not part of the answer.
STOP_MARKER = "\n### "


def _marker_overlap(text: str) -> int:
    """Length of the longest end of ``text`` that could begin STOP_MARKER."""
    return max((k for k in range(1, len(STOP_MARKER)) if text.endswith(STOP_MARKER[:k])), default=0)


@dataclass
class PreparedRound:
    """A round checked against the conversation it joins (:meth:`Session.prepare_round`), nothing changed
    yet: the round (stripped question, opened images, the given answer or None), its generation
    settings, and the whole conversation rendered with it."""

    round: Round
    config: GenerationConfig
    rendered: Rendered
    answer_ids: list[int] | None  # a given answer's ids (a history round); None: to be generated
    redo: bool  # it replaces the last round's answer (Regenerate)
    at: int  # how many rounds the conversation had when it was prepared


class Session:
    def __init__(self, vc, system: str | None = None):
        self.vc = vc
        self.conversation = Conversation(system=system if system is not None else vc.config.system)
        self._answer_ids: list[list[int] | None] = []  # exact generated ids per round (EOS included)
        self._features: list[torch.Tensor] = []  # [K, d_vis] per encoded image, in conversation order
        self._uids: list[int] = []
        self._cache = None
        self._cache_keys: list = []  # one key per token in the cache
        self._cache_is_image: list[bool] = []
        self.last_stats: dict = {}
        self.finish_reason: str | None = None  # why the last answer ended (FINISH_REASONS); None while it runs
        self.numbered = False  # messages name the round ("the question of round 2"): a request's conversation

    # -- state ---------------------------------------------------------------------------------
    @property
    def images(self) -> list:
        return self.conversation.images

    def prompt_text(self) -> str:
        """The Figure-3 prompt of the conversation so far, each image as ``[Image i: K tokens]``; user
        text escaped and generated answers decoded from their ids, as the model gets them."""
        return self.vc.template.render_text(self.conversation, answer_ids=self._answer_ids)

    def reset(self) -> None:
        self.__init__(self.vc, self.conversation.system)

    def attention_maps(self):
        """Where the last answer looked: a :class:`~visualchat.attention_maps.AttentionMaps` (per-image heat
        maps and shares, mean of all layers or one). Costs one extra forward of the conversation with the
        attention captured; the KV cache and the conversation are not touched. ValueError when there is
        no answered round or no image."""
        from .attention_maps import compute

        rounds = self.conversation.rounds
        if not rounds or rounds[-1].answer is None:
            raise ValueError("there is no answer yet to show where it looked; ask something first")
        self._encode_new_images()
        feats = torch.stack(self._features) if self._features else None
        return compute(self.vc, self._render(), feats)

    def cache_bytes(self) -> int:
        """Memory held by the KV cache (each storage counted once; 0 when there is none)."""
        seen, total = set(), 0
        for layer in getattr(self._cache, "layers", None) or ():
            for t in vars(layer).values():
                if torch.is_tensor(t) and t.numel():
                    st = t.untyped_storage()
                    if st.data_ptr() not in seen:
                        seen.add(st.data_ptr())
                        total += st.nbytes()
        return total

    def drop_cache(self) -> None:
        """Forget the KV cache (to free memory, or after a failed forward left it inconsistent); the next
        forward recomputes the conversation from its tokens and stored image features."""
        self._cache, self._cache_keys, self._cache_is_image = None, [], []

    def undo(self) -> Round | None:
        """Remove the last round (and its images). Returns it, or None if there is none."""
        if not self.conversation.rounds:
            return None
        rnd = self.conversation.rounds.pop()
        self._answer_ids.pop()
        n = len(self.images)
        del self._features[n:], self._uids[n:]
        return rnd

    # -- rendering -----------------------------------------------------------------------------
    def _render(self, rounds: Sequence[Round] | None = None, answer_ids: Sequence | None = None) -> Rendered:
        """The conversation as the model is fed it (or ``rounds`` with their ``answer_ids``)."""
        if rounds is None:
            rounds, answer_ids = self.conversation.rounds, self._answer_ids
        t = self.vc.template
        out = t.render_system(self.conversation.system)
        first = 1
        for rnd, ids in zip(rounds, answer_ids):
            out.extend(t.render_round(rnd, first, answer_ids=ids))
            first += len(rnd.images)
        return out

    def _keys_and_rows(self, r: Rendered) -> tuple[list, list[tuple[int, int]]]:
        k = self.vc.config.image_tokens
        keys, rows, n_img = [], [], 0
        for tok, is_img in zip(r.input_ids, r.is_image):
            if is_img:
                img, row = divmod(n_img, k)
                keys.append((self._uids[img], row))
                rows.append((img, row))
                n_img += 1
            else:
                keys.append(tok)
        return keys, rows

    # -- model calls ---------------------------------------------------------------------------
    @torch.no_grad()
    def _encode_new_images(self) -> None:
        """Run the images that arrived since the last forward through the encoder (each image once)."""
        new = self.images[len(self._features):]
        if new:
            self._features += list(self.vc.model.encode_images(new).cpu())

    @torch.no_grad()
    def _prefill(self, r: Rendered) -> torch.Tensor:
        """Feed what the cache lacks of ``r``; return the logits after its last token."""
        self._encode_new_images()
        keys, rows = self._keys_and_rows(r)
        p = 0
        for a, b in zip(self._cache_keys, keys):
            if a != b:
                break
            p += 1
        p = min(p, len(keys) - 1)  # at least one token must be fed to get logits
        if self._cache is None or p == 0:
            self._cache, p = None, 0
        elif p < len(self._cache_keys):
            self._cache.crop(p - len(self._cache_keys))  # transformers 5: a negative count removes tokens
        dev = self.vc.device
        n_img_before = sum(r.is_image[:p])
        new_rows = rows[n_img_before:]
        image_embeds = self.vc.model.image_embeds(self._features, new_rows) if new_rows else None
        ids = torch.tensor([r.input_ids[p:]], device=dev)
        is_img = torch.tensor([r.is_image[p:]], device=dev)
        kis = torch.tensor([r.is_image], device=dev)
        if self._cache is None:
            self._cache = self.vc.model.new_cache()
        out = self.vc.model(ids, is_img, None, past_key_values=self._cache, key_is_image=kis, use_cache=True,
                            logits_to_keep=1, image_embeds=image_embeds)
        logits, self._cache = out.logits, out.cache
        self._cache_keys = keys
        self._cache_is_image = list(r.is_image)
        self.last_stats["prefill_tokens"] = len(keys) - p
        return logits[0, -1]

    @torch.no_grad()
    def _step(self, token: int) -> torch.Tensor:
        self._cache_keys.append(token)
        self._cache_is_image.append(False)
        logits, self._cache = self.vc.decode_step(token, self._cache, self._cache_is_image)
        return logits

    # -- public --------------------------------------------------------------------------------
    @classmethod
    def from_history(cls, vc, history: Sequence[dict] = (), system: str | None = None,
                     limits: Limits | None = None, numbered: bool = False) -> "Session":
        """A session holding ``history`` (dicts with question, images, answer), each round checked by
        :meth:`prepare_round` (against ``limits``, when given); nothing is run (the first forward encodes
        and prefills it). ``numbered``: messages name the round ("the question of round 2"), as a
        request's conversation wants."""
        session = cls(vc, system)
        session.numbered = numbered
        for r in history:
            answer = r.get("answer")
            session.add_round(r.get("question"), r.get("images") or (), "" if answer is None else answer, limits=limits)
        return session

    def prepare_round(self, question, images: Sequence = (), *, answer: str | None = None, redo: bool = False,
                      limits: Limits | None = None, **gen) -> PreparedRound:
        """Check a round against this conversation and return it ready to add, changing nothing. THE
        check of a round: :meth:`stream`, :meth:`add_round` and :meth:`regenerate` call it, and so does
        every path that drives a session. In this order, raising the first that fails:

        1. the question: ``ValueError`` when it is not text, holds a lone surrogate, is longer than
           ``limits.max_question_chars`` or is empty (it is stripped);
        2. the generation settings: ``ValueError`` naming the field (:class:`GenerationConfig`; to
           generate, ``max_new_tokens`` at most ``limits.max_new_tokens``, which also caps its default);
        3. a given answer: ``ValueError`` when it is not text or longer than ``limits.max_answer_chars``;
        4. the images, opened: :class:`~visualchat.images.ImageError`;
        5. the image count: :class:`TooManyImagesError`;
        6. the conversation with this round fits the context window: :class:`ContextWindowError`.

        ``answer``: the round's given answer (a history round; nothing is generated). ``redo``: the round
        replaces the last one's answer (``images`` are then that round's, already open). ``limits``: a
        server's limits on one request (None: only the model's own bounds)."""
        rounds, ids = list(self.conversation.rounds), list(self._answer_ids)
        named = f" of round {len(rounds) + (0 if redo else 1)}" if self.numbered else ""
        question = check_question(question, limits, f"the question{named}")
        cap = limits.max_new_tokens if limits and answer is None else None  # (a given answer generates nothing)
        if cap is not None and "max_new_tokens" not in gen:
            gen["max_new_tokens"] = min(GenerationConfig.max_new_tokens, cap)  # the default, within the cap
        config = GenerationConfig(**gen, max_new_tokens_limit=cap)
        if answer is not None:
            answer = check_text(answer, f"the answer{named}", limits.max_answer_chars if limits else None,
                                required=False).strip()
        if redo:
            if not rounds:
                raise ValueError("there is no round to regenerate")
            opened = list(images)
            rounds, ids = rounds[:-1], ids[:-1]
        else:
            opened = [open_image(im, limits.max_pixels if limits else None) for im in images]
        check_image_count(sum(len(r.images) for r in rounds) + len(opened), self.vc.config.max_images)
        eos = self.vc.template.eos_id
        if ids and ids[-1] is None:  # stopped before its first token: it joins as an empty answer
            ids[-1] = [eos]
        answer_ids = None
        if answer is not None:
            # escaped like every user text: a marker or special-token string in it is never structure
            answer_ids = self.vc.template.answer_ids(answer) if answer else [eos]
        rnd = Round(question, images=opened, answer=answer)
        rendered = self._render(rounds + [rnd], ids + [answer_ids])
        check_context(rendered, self.vc.context_window)
        return PreparedRound(rnd, config, rendered, answer_ids, redo, len(self.conversation.rounds))

    def commit(self, p: PreparedRound) -> Round:
        """Add a prepared round (or, for ``redo``, reopen the last one's answer); runs nothing."""
        rounds = self.conversation.rounds
        if p.at != len(rounds):
            raise RuntimeError("the conversation changed after this round was prepared; prepare it again")
        if p.redo:
            rounds[-1].answer, self._answer_ids[-1] = None, None
            return rounds[-1]
        if rounds and self._answer_ids[-1] is None:  # stopped before its first token
            rounds[-1].answer = ""
            self._answer_ids[-1] = [self.vc.template.eos_id]
        rounds.append(p.round)
        self._answer_ids.append(p.answer_ids)
        self._uids += [next(_uids) for _ in p.round.images]
        return p.round

    def generate(self, p: PreparedRound) -> Iterator[str]:
        """Add a prepared round and return the generator of its answer (:meth:`stream` is
        :meth:`prepare_round` then this)."""
        if p.answer_ids is not None:
            raise ValueError("this round already has its answer; add it with add_round")
        self.commit(p)
        return self._run(p.rendered, p.config, min(p.config.max_new_tokens, self.vc.context_window - len(p.rendered)),
                         new_round=not p.redo)

    def stream(self, question: str, images: Sequence = (), **gen) -> Iterator[str]:
        """Add a round and yield its answer in text pieces as they are generated. Closing the
        generator early (a Stop button) keeps the partial answer. Once it has ended, :attr:`finish_reason`
        says why: ``stop``, ``length`` or ``stopped`` (closed early). Bad input raises before anything
        changes (:meth:`prepare_round`): :class:`~visualchat.images.ImageError`,
        :class:`TooManyImagesError`, :class:`ContextWindowError`, ``ValueError`` for an empty question
        or a bad generation setting."""
        return self.generate(self.prepare_round(question, images, **gen))

    def add_round(self, question: str, images: Sequence = (), answer: str = "", limits: Limits | None = None) -> Round:
        """Append a finished round with a given answer, generating nothing (an API caller's history,
        or a conversation replayed in a fresh process). Checked by :meth:`prepare_round` like
        :meth:`stream`; the next forward prefills it."""
        return self.commit(self.prepare_round(question, images, answer=answer, limits=limits))

    def set_answer(self, text: str) -> None:
        """Give the open last round the answer generated elsewhere (the ZeroGPU replay's worker)."""
        text = (text or "").strip()
        self.conversation.rounds[-1].answer = text
        self._answer_ids[-1] = self.vc.template.answer_ids(text) if text else [self.vc.template.eos_id]

    def regenerate(self, **gen) -> Iterator[str]:
        """Drop the last answer and generate it again (the images are not re-encoded)."""
        if not self.conversation.rounds:
            raise ValueError("there is no round to regenerate")
        last = self.conversation.rounds[-1]
        return self.generate(self.prepare_round(last.question, last.images, redo=True, **gen))

    def ask(self, question: str, images: Sequence = (), **gen) -> Answer:
        """The whole answer: a ``str`` whose ``finish_reason`` is ``stop`` or ``length``."""
        text = "".join(self.stream(question, images, **gen))
        return Answer(text, self.finish_reason)

    def _run(self, r: Rendered, cfg: GenerationConfig, max_tokens: int, new_round: bool) -> Iterator[str]:
        rnd = self.conversation.rounds[-1]
        streamer = TextStreamer(self.vc.tokenizer)
        eos = self.vc.template.eos_id
        ids: list[int] = []
        t0 = time.perf_counter()
        self.last_stats, self.finish_reason = {}, None
        ending = "stopped"  # until the loop below ends by itself
        try:
            logits = self._prefill(r)
        except BaseException:  # the prefill failed: drop the cache, and the round if this call added it
            self.drop_cache()
            if new_round:
                self.undo()
            raise
        self.last_stats["ttft_s"] = time.perf_counter() - t0
        try:
            sent = 0  # characters yielded so far; a possible start of STOP_MARKER is held back
            for tok in sample_stream(self._step, logits, eos, cfg, max_tokens):
                ids.append(tok)
                if tok == eos:
                    break
                streamer.push(tok)
                text = streamer.text
                if STOP_MARKER in text:  # the model began the next "### Question:" itself
                    break
                safe = len(text) - _marker_overlap(text)
                if safe > sent:
                    yield text[sent:safe]
                    sent = safe
            cut = ids[-1] != eos and STOP_MARKER not in streamer.text and len(ids) >= max_tokens
            text = streamer.text.split(STOP_MARKER)[0]
            if len(text) > sent:
                yield text[sent:]
            ending = "length" if cut else "stop"
        except Exception:  # a forward failed mid-answer: its cache may hold a token its keys lack
            self.drop_cache()
            ending = None
            raise
        finally:  # also on Stop (GeneratorExit) or an error mid-answer: keep what was generated
            text = streamer.text
            if STOP_MARKER in text:  # keep the answer before the marker, as ids a re-render reproduces
                text = text[: text.index(STOP_MARKER)]
                ids = self.vc.template.encode_text(text.strip())
            rnd.answer = text.strip()
            self.finish_reason = ending
            self._answer_ids[-1] = ids + ([eos] if not ids or ids[-1] != eos else [])
            dt = time.perf_counter() - t0
            self.last_stats.update(new_tokens=len(ids), total_s=dt,
                                   tokens_per_s=len(ids) / max(dt - self.last_stats["ttft_s"], 1e-9))
