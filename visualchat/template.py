"""The Figure-3 prompt template: a conversation in, token ids + image slots + answer-only labels out.

Template version 1. The layout, written once here and used by training, chat and eval alike::

    <bos>{system}\\n\\n
    ### Image 1:\\n<K image tokens>\\n          <- each new image of the round, numbered across the chat
    ### Image 2:\\n<K image tokens>\\n
    ### Question:\\n{question}\\n\\n### Answer:\\n{answer}<eos>\\n\\n
    ### Image 3:\\n<K image tokens>\\n          <- a later round may bring more images
    ### Question:\\n{question}\\n\\n### Answer:\\n          <- the open round ends here; the model goes on

Rules:
- ``<bos>`` is the tokenizer's BOS token when it has one distinct from EOS, else nothing.
- None of the markers are special tokens; they are plain text.
- Each text piece between image runs is tokenized on its own (``add_special_tokens=False``), so the
  ids of a round never depend on what came before it. That makes incremental rendering (the chat's
  prefix cache) give exactly the ids of a full render.
- Labels are -100 everywhere except the answer tokens and their ``<eos>`` in every answered round.
  The ``\\n\\n`` that separates rounds is not a label.
- Image slots hold ``image_token_id`` placeholders; the model writes the projected image features
  into those rows.

User text never becomes structure. The system prompt, every question and every answer given as text
(an API caller's history) go through :meth:`Template.user_text` before tokenization, which applies a
visible escaping rule:

- every run of three or more ``#`` has its ``#`` separated by spaces: ``### Answer:`` becomes
  ``# # # Answer:``, so user text can never spell a template marker (``### Image i:``,
  ``### Question:``, ``### Answer:``) nor the ``\n### `` that ends a generated answer;
- every occurrence of one of the tokenizer's special-token strings (``<|im_end|>``, ``</s>``, ...)
  gets a space after its first character: ``< |im_end|>``.

Text is then tokenized with special tokens *not* parsed (``split_special_tokens=True``), so even a
string the rule misses can never become a special token id; a tokenizer that ignores that option
is refused. :meth:`Template.render_text` (the app's prompt panel) shows the escaped text, i.e.
exactly what the model gets, and every special token shown there is a real one. Text without
``###`` runs or special-token strings (all shipped training data) renders to the same ids as before.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

TEMPLATE_VERSION = 1
DEFAULT_SYSTEM = "You are a powerful vision-language assistant."
IGNORE_INDEX = -100
_HASH_RUN = re.compile(r"#{3,}")


@dataclass
class Round:
    """One round: the images it brings (any objects; the template only counts them), a question,
    and the answer once there is one."""

    question: str
    images: list[Any] = field(default_factory=list)
    answer: str | None = None


@dataclass
class Conversation:
    rounds: list[Round] = field(default_factory=list)
    system: str = DEFAULT_SYSTEM

    @property
    def images(self) -> list[Any]:
        return [im for r in self.rounds for im in r.images]


@dataclass
class Rendered:
    """Token ids of a rendered conversation (or of a piece of one).

    ``is_image[t]`` is True on image slots; ``labels[t]`` is the target *at* position t (not shifted),
    -100 where there is no loss. ``round_starts[r]`` is the index where round r begins and
    ``answer_starts[r]`` where its answer begins (= its prompt's end)."""

    input_ids: list[int] = field(default_factory=list)
    is_image: list[bool] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    round_starts: list[int] = field(default_factory=list)
    answer_starts: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def extend(self, other: "Rendered") -> None:
        off = len(self.input_ids)
        self.input_ids += other.input_ids
        self.is_image += other.is_image
        self.labels += other.labels
        self.round_starts += [s + off for s in other.round_starts]
        self.answer_starts += [s + off for s in other.answer_starts]


class Template:
    """Renders conversations for one tokenizer and one number of image tokens ``K``."""

    version = TEMPLATE_VERSION

    def __init__(self, tokenizer, image_tokens: int, image_token_id: int | None = None):
        if image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1, got {image_tokens}")
        self.tokenizer = tokenizer
        self.k = image_tokens
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError("the tokenizer has no EOS token; the template needs one to end answers")
        bos = getattr(tokenizer, "bos_token_id", None)
        self.bos_ids = [bos] if bos is not None and bos != self.eos_id else []
        pad = getattr(tokenizer, "pad_token_id", None)
        self.image_token_id = image_token_id if image_token_id is not None else (pad if pad is not None else self.eos_id)
        self._cache: dict[str, list[int]] = {}
        specials = {str(t) for t in (getattr(tokenizer, "all_special_tokens", None) or [])}
        for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(added.content))
        # the ids text must never produce: every special token (BOS and EOS included); the unknown
        # token is an ordinary outcome of text, not structure
        self._special_ids = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
        self._special_ids |= {int(i) for i, a in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                              if getattr(a, "special", False)}
        self._special_ids |= {self.eos_id, *self.bos_ids}
        unk = getattr(tokenizer, "unk_token_id", None)
        self._special_ids.discard(unk)
        breakable = sorted((t for t in specials if len(t) >= 2), key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, breakable))) if breakable else None

    # -- user text ------------------------------------------------------------------------------
    def user_text(self, text: str) -> str:
        """``text`` with the escaping rule of the module docstring applied: no run of three ``#`` and
        no special-token string survives. Idempotent; text without either comes back unchanged."""
        text = _HASH_RUN.sub(lambda m: " ".join(m.group(0)), text)
        if self._special_re is not None:
            text = self._special_re.sub(lambda m: m.group(0)[0] + " " + m.group(0)[1:], text)
        return text

    def encode_text(self, text: str) -> list[int]:
        """Token ids of plain text: no BOS/EOS added and special-token strings *not* parsed (they
        are split into ordinary tokens). Raises ValueError if the tokenizer still produced a special
        token id (one that ignores ``split_special_tokens``), rather than let text act as structure."""
        return list(self._ids(text))

    def answer_ids(self, answer: str) -> list[int]:
        """The ids of an answer given as text (escaped like all user text), EOS included."""
        return self._ids(self.user_text(answer)) + [self.eos_id]

    # -- pieces -----------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            try:
                enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)
            except TypeError:  # a minimal tokenizer without the option; the check below still holds
                enc = self.tokenizer(text, add_special_tokens=False)
            ids = list(enc["input_ids"])
            bad = sorted(set(ids) & self._special_ids)
            if bad:
                raise ValueError(
                    f"the tokenizer {type(self.tokenizer).__name__} turned the text {text[:60]!r} into special "
                    f"token ids {bad}; it must support split_special_tokens=True so that text never becomes "
                    "template structure")
            self._cache[text] = ids
        return self._cache[text]

    def _text(self, out: Rendered, text: str, label: bool = False) -> None:
        ids = self._ids(text)
        out.input_ids += ids
        out.is_image += [False] * len(ids)
        out.labels += ids if label else [IGNORE_INDEX] * len(ids)

    def _image(self, out: Rendered) -> None:
        out.input_ids += [self.image_token_id] * self.k
        out.is_image += [True] * self.k
        out.labels += [IGNORE_INDEX] * self.k

    # -- public -----------------------------------------------------------------------------
    def render_system(self, system: str = DEFAULT_SYSTEM) -> Rendered:
        out = Rendered()
        out.input_ids += self.bos_ids
        out.is_image += [False] * len(self.bos_ids)
        out.labels += [IGNORE_INDEX] * len(self.bos_ids)
        self._text(out, f"{self.user_text(system)}\n\n")
        return out

    def render_round(self, rnd: Round, first_image: int, answer_ids: Sequence[int] | None = None) -> Rendered:
        """Render one round whose first new image is number ``first_image`` (1-based).

        With ``rnd.answer`` (or ``answer_ids``, the exact ids a model generated, EOS included) the
        round is closed: answer, EOS and the round separator follow. Otherwise it ends after
        ``### Answer:\\n``, ready for generation."""
        out = Rendered()
        out.round_starts.append(0)
        for j, _ in enumerate(rnd.images):
            self._text(out, f"### Image {first_image + j}:\n")
            self._image(out)
            self._text(out, "\n")
        self._text(out, f"### Question:\n{self.user_text(rnd.question)}\n\n### Answer:\n")
        out.answer_starts.append(len(out.input_ids))
        if answer_ids is None and rnd.answer is not None:
            answer_ids = self.answer_ids(rnd.answer)
        if answer_ids is not None:
            answer_ids = list(answer_ids)
            if not answer_ids or answer_ids[-1] != self.eos_id:
                answer_ids.append(self.eos_id)
            out.input_ids += answer_ids
            out.is_image += [False] * len(answer_ids)
            out.labels += answer_ids
            self._text(out, "\n\n")
        return out

    def render(self, conv: Conversation) -> Rendered:
        """Render a whole conversation. Every round but the last must be answered."""
        out = self.render_system(conv.system)
        n = 1
        for i, rnd in enumerate(conv.rounds):
            if rnd.answer is None and i != len(conv.rounds) - 1:
                raise ValueError(f"round {i + 1} has no answer, but only the last round may be open")
            out.extend(self.render_round(rnd, n))
            n += len(rnd.images)
        return out

    def render_text(self, conv: Conversation, answer_ids: Sequence[Sequence[int] | None] | None = None) -> str:
        """The prompt as the model sees it, with each image run shown as ``[Image i: K tokens]``.

        User text appears escaped (:meth:`user_text`), as the model gets it, so a marker or special
        token shown here is a real one. ``answer_ids[r]``, when given (a session's generated ids), is
        shown decoded instead of round r's answer text: that is what the model was fed."""
        eos = self.tokenizer.eos_token or ""
        parts = [f"{self.user_text(conv.system)}\n\n"]
        n = 1
        for r, rnd in enumerate(conv.rounds):
            for _ in rnd.images:
                parts.append(f"### Image {n}:\n[Image {n}: {self.k} tokens]\n")
                n += 1
            parts.append(f"### Question:\n{self.user_text(rnd.question)}\n\n### Answer:\n")
            ids = answer_ids[r] if answer_ids is not None and r < len(answer_ids) else None
            if ids is not None:
                ids = list(ids)
                if ids and ids[-1] == self.eos_id:
                    ids = ids[:-1]
                parts.append(f"{self.tokenizer.decode(ids, skip_special_tokens=False)}{eos}\n\n")
            elif rnd.answer is not None:
                parts.append(f"{self.user_text(rnd.answer)}{eos}\n\n")
        return "".join(parts)
