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
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

TEMPLATE_VERSION = 1
DEFAULT_SYSTEM = "You are a powerful vision-language assistant."
IGNORE_INDEX = -100


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

    # -- pieces -----------------------------------------------------------------------------
    def _ids(self, text: str) -> list[int]:
        if text not in self._cache:
            if len(self._cache) > 4096:
                self._cache.clear()
            self._cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
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
        self._text(out, f"{system}\n\n")
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
        self._text(out, f"### Question:\n{rnd.question}\n\n### Answer:\n")
        out.answer_starts.append(len(out.input_ids))
        if answer_ids is None and rnd.answer is not None:
            answer_ids = self._ids(rnd.answer) + [self.eos_id]
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

    def render_text(self, conv: Conversation) -> str:
        """The prompt as the model sees it, with each image run shown as ``[Image i: K tokens]``."""
        parts = [f"{conv.system}\n\n"]
        n = 1
        for rnd in conv.rounds:
            for _ in rnd.images:
                parts.append(f"### Image {n}:\n[Image {n}: {self.k} tokens]\n")
                n += 1
            parts.append(f"### Question:\n{rnd.question}\n\n### Answer:\n")
            if rnd.answer is not None:
                parts.append(f"{rnd.answer}{self.tokenizer.eos_token or ''}\n\n")
        return "".join(parts)
