"""How an answer is generated: the settings (:class:`GenerationConfig`, their one check) and the sampling
loop (greedy or temperature/top-p sampling with a repetition penalty, stop on EOS, streaming text
pieces as tokens arrive)."""
from __future__ import annotations

from dataclasses import InitVar, dataclass
from typing import Callable, Iterator

import torch


def check_number(value, field: str, lo: float, hi: float, lo_open: bool = False, integer: bool = False,
                 allowed: str | None = None):
    """``value`` as a finite number (an int when ``integer``) in [lo, hi] (or (lo, hi]), else a ValueError
    that names the field and what is allowed (``allowed``, else said from the bounds)."""
    allowed = allowed or (f"{'a whole number' if integer else 'a number'} "
                          f"{'>' if lo_open else '>='} {lo:g} and <= {hi:g}")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{field} must be {allowed}, got {'null' if value is None else type(value).__name__}")
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        raise ValueError(f"{field} must be {allowed}, got {value}")
    if integer:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{field} must be {allowed}, got {value}")
        value = int(value)
    if value < lo or (lo_open and value == lo) or value > hi:
        raise ValueError(f"{field} must be {allowed}, got {value}")
    return value


@dataclass
class GenerationConfig:
    """How an answer is generated: THE check of generation settings. Making one checks every field (its
    type, finiteness and range, e.g. a JSON request's ``"12"`` or ``NaN``) and normalises it (``12.0``
    becomes ``12``), raising a ValueError that names the field and what is allowed. ``max_new_tokens_limit``
    (a server's :attr:`visualchat.limits.Limits.max_new_tokens`) caps ``max_new_tokens``; it is not kept."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # 1 = off; applied to tokens already in the answer
    seed: int | None = None
    max_new_tokens_limit: InitVar[int | None] = None

    def __post_init__(self, max_new_tokens_limit: int | None):
        cap = max_new_tokens_limit
        self.max_new_tokens = check_number(
            self.max_new_tokens, "max_new_tokens", 1, cap or float("inf"), integer=True,
            allowed=f"a whole number from 1 to {cap} (this server's limit)" if cap else "a whole number >= 1")
        self.temperature = float(check_number(self.temperature, "temperature", 0, 5,
                                              allowed="a number from 0 (greedy) to 5"))
        self.top_p = float(check_number(self.top_p, "top_p", 0, 1, lo_open=True, allowed="a number > 0 and <= 1"))
        self.repetition_penalty = float(check_number(self.repetition_penalty, "repetition_penalty", 0, 10, lo_open=True,
                                                     allowed="a number > 0 and <= 10 (1 = off)"))
        if self.seed is not None:
            self.seed = check_number(self.seed, "seed", 0, 2 ** 63 - 1, integer=True,
                                     allowed="null or a whole number from 0 to 2**63-1")


def next_token(logits: torch.Tensor, previous: list[int], cfg: GenerationConfig,
               generator: torch.Generator | None = None) -> int:
    """Pick the next token from ``logits [V]`` (float32)."""
    if cfg.temperature == 0 and (cfg.repetition_penalty == 1.0 or not previous):
        return int(logits.argmax())  # greedy: nothing to change, so no copy of the vocabulary's logits
    logits = logits.float().clone()
    if cfg.repetition_penalty != 1.0 and previous:
        idx = torch.tensor(sorted(set(previous)), device=logits.device)
        seen = logits[idx]
        logits[idx] = torch.where(seen > 0, seen / cfg.repetition_penalty, seen * cfg.repetition_penalty)
    if cfg.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < cfg.top_p  # always keeps the top token
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


class TextStreamer:
    """Turns token ids, pushed one at a time, into new text pieces, holding back incomplete UTF-8.

    Each push decodes a short window, not the whole answer: the ids not yet in :attr:`text` together
    with those of the piece before them, minus that piece's text. A tokenizer that spells a token by
    its neighbour (SentencePiece's leading space, a character's bytes split over tokens, clean-up of
    spaces before punctuation) so gives the same text as decoding all the ids at once."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._start = 0  # the window: ids[_start:] are decoded at each push ...
        self._done = 0  # ... and ids[_start:_done] are already in text, as _done_text
        self._done_text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        window = self.tokenizer.decode(self.ids[self._start:], skip_special_tokens=True)
        if window.endswith("\ufffd") or len(window) <= len(self._done_text):
            return ""  # a multi-byte character is not complete yet, or nothing new (a skipped special token)
        piece = window[len(self._done_text):]
        self.text += piece
        self._start, self._done = self._done, len(self.ids)
        self._done_text = self.tokenizer.decode(self.ids[self._start:self._done], skip_special_tokens=True)
        return piece


def sample_stream(step: Callable[[int], torch.Tensor], first_logits: torch.Tensor, eos_id: int,
                  cfg: GenerationConfig, max_tokens: int) -> Iterator[int]:
    """Yield token ids until EOS (yielded too) or ``max_tokens``. ``step(token)`` feeds one token and
    returns the next logits."""
    gen = None
    if cfg.seed is not None:
        gen = torch.Generator().manual_seed(cfg.seed)
    logits, out = first_logits, []
    for i in range(max_tokens):
        tok = next_token(logits, out, cfg, gen)
        out.append(tok)
        yield tok
        if tok == eos_id or i + 1 == max_tokens:
            return
        logits = step(tok)
