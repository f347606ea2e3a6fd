"""Turning loaded conversations into training samples: concatenation, image and length limits.

- :func:`pack` concatenates ``k`` conversations of a set into one training sample, per set (the
  paper's recipe: llava 3, llava_dial 2, every other set 1 — :data:`PAPER_COUNTS`). Rounds are
  appended, so the images keep their order and their numbering simply continues ("Image 1..n" of
  the second conversation become "Image n+1.."); the template numbers images by position, so no
  text needs rewriting. A sample never goes over ``max_images``: a conversation that would push
  it over starts the next sample instead. Only conversations with the same system prompt are
  concatenated. With ``draw="random"`` each sample takes a random 1..k conversations instead (the
  original's ``DST.random_grouping``: on average (k + 1) / 2, which is what gives the paper's Table 1
  its counts, e.g. LLaVA's 100k conversations -> 49,924 samples with k = 3); the draw is seeded.
- :func:`limit_images` drops whole trailing rounds to stay within ``max_images`` (default 8).
- :func:`fit_to_length` drops whole trailing rounds until the rendered length fits.
"""
from __future__ import annotations

import logging
import random
from typing import Callable, Mapping, Sequence

from visualchat.template import Conversation

from ._common import DEFAULT_MAX_IMAGES, limit_images

__all__ = ["PAPER_COUNTS", "concat", "pack", "pack_set", "fit_to_length", "limit_images"]

log = logging.getLogger("visualchat_train.data.packing")

#: Conversations concatenated into one training sample, per data set (others: 1).
PAPER_COUNTS = {"llava": 3, "llava_dial": 2}


def concat(convs: Sequence[Conversation]) -> Conversation:
    """One conversation holding the rounds of all of ``convs`` in order; the first one's system."""
    if not convs:
        raise ValueError("concat needs at least one conversation")
    return Conversation(rounds=[r for c in convs for r in c.rounds], system=convs[0].system)


DRAWS = ("exact", "random")


def pack_set(convs: Sequence[Conversation], k: int, *, max_images: int | None = DEFAULT_MAX_IMAGES,
             seed: int | None = None, draw: str = "exact") -> list[Conversation]:
    """Concatenate up to ``k`` consecutive conversations (shuffled first with ``seed`` if given) into
    each sample, without going over ``max_images``. ``draw="random"``: each sample's target is drawn
    uniformly from 1..k (with ``seed``; 0 if None) instead of being k. A conversation that alone has
    too many images loses its trailing rounds (or is left out, logged, if its first round already has
    too many)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {', '.join(DRAWS)}, got {draw!r}")
    items = list(convs)
    if seed is not None:
        random.Random(seed).shuffle(items)
    rng = random.Random(0 if seed is None else seed + 15485863)
    target = rng.randint(1, k) if draw == "random" else k
    out: list[Conversation] = []
    cur: list[Conversation] = []
    cur_images = 0
    dropped = 0
    for c in items:
        c = limit_images(c, max_images)
        if c is None:
            dropped += 1
            continue
        n = len(c.images)
        fits = (len(cur) < target and (max_images is None or cur_images + n <= max_images)
                and (not cur or c.system == cur[0].system))
        if cur and not fits:
            out.append(concat(cur) if len(cur) > 1 else cur[0])
            cur, cur_images = [], 0
            if draw == "random":
                target = rng.randint(1, k)
        cur.append(c)
        cur_images += n
    if cur:
        out.append(concat(cur) if len(cur) > 1 else cur[0])
    if dropped:
        log.info("packing: left out %d conversations whose first round has more than %s images", dropped, max_images)
    return out


def pack(conversations: Mapping[str, Sequence[Conversation]], per_set_counts: Mapping[str, int] | None = None, *,
         default_count: int = 1, max_images: int | None = DEFAULT_MAX_IMAGES,
         seed: int | None = None, draw: str = "exact") -> dict[str, list[Conversation]]:
    """Pack every set of ``conversations`` (name -> conversations) with its count from
    ``per_set_counts`` (default :data:`PAPER_COUNTS`; sets not named use ``default_count``), exactly
    that many per sample or (``draw="random"``) a random 1..count. Returns name -> training samples."""
    counts = PAPER_COUNTS if per_set_counts is None else per_set_counts
    unknown = set(counts) - set(conversations)
    if unknown:
        log.debug("packing: counts given for sets not loaded: %s", sorted(unknown))
    return {name: pack_set(convs, int(counts.get(name, default_count)), max_images=max_images,
                           seed=None if seed is None else seed + i, draw=draw)
            for i, (name, convs) in enumerate(conversations.items())}


def fit_to_length(conversation: Conversation, count_tokens: Callable[[Conversation], int],
                  max_len: int) -> Conversation | None:
    """The longest prefix of whole rounds whose rendered length ``count_tokens(...)`` is at most
    ``max_len``: ``conversation`` itself if it fits, a shorter copy if not, None if even the first
    round alone is too long (the caller counts that skip).

    Only whole rounds go, so no image is cut and no answer is parted from its question. Assumes
    (as a render does) that more rounds never give fewer tokens; finds the cut by bisection."""
    rounds = conversation.rounds
    if not rounds:
        return None

    def prefix(n: int) -> Conversation:
        return conversation if n == len(rounds) else Conversation(rounds=list(rounds[:n]), system=conversation.system)

    if count_tokens(conversation) <= max_len:
        return conversation
    if count_tokens(prefix(1)) > max_len:
        return None
    lo, hi = 1, len(rounds) - 1  # prefix(lo) fits; prefix(hi + 1) does not
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count_tokens(prefix(mid)) <= max_len:
            lo = mid
        else:
            hi = mid - 1
    return prefix(lo)
