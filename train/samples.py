"""Data sets -> rendered training samples: load, split, check images, pack, render, cut to length.

Everything about the text goes through :class:`visualchat.template.Template` (the one template);
this module only decides which conversations become which samples.
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from visualchat.template import IGNORE_INDEX, Conversation, Template

from train.data import DATASETS, load_dataset
from train.data.packing import PAPER_COUNTS, fit_to_length, pack
from train.data.validate import validate_images

from .features import is_lazy, open_ref

log = logging.getLogger("train.samples")

#: Data sets that need no ``--data_path`` (generated).
GENERATED = ("shapes", "shapes_dense")
#: Conversations drawn from a generated set when ``--dataset_samples all``.
SHAPES_DEFAULT_N = 2000


@dataclass
class Sample:
    input_ids: list[int]
    is_image: list[bool]
    labels: list[int]
    images: list[Any]  # image references, in slot order
    source: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_labels(self) -> int:
        return sum(x != IGNORE_INDEX for x in self.labels)


@dataclass
class DataStats:
    counts: Counter = field(default_factory=Counter)

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# -- flag parsing -----------------------------------------------------------------------------
def parse_names(value: str | list[str]) -> list[str]:
    items = value if isinstance(value, list) else [value]
    out = []
    for it in items:
        out += [x.strip() for x in str(it).replace(",", " ").split() if x.strip()]
    return out


def parse_per_set(value: str, names: list[str], what: str, allow_all: bool = True) -> dict[str, int | None]:
    """``all`` / ``N`` (every set) / ``name:N,name:N`` -> name -> N (None = all)."""
    value = str(value).strip()
    out: dict[str, int | None] = {n: None for n in names}
    if value in ("all", "") and allow_all:
        return out
    for part in value.replace(" ", "").split(","):
        if not part:
            continue
        name, sep, num = part.rpartition(":")
        try:
            count = None if num == "all" and allow_all else int(num)
        except ValueError:
            raise ValueError(f"{what}: expected 'all', a number, or name:number pairs, got {value!r}") from None
        if count is not None and count < 1:
            raise ValueError(f"{what}: counts must be >= 1, got {part!r}")
        if sep:
            if name not in names:
                raise ValueError(f"{what}: {name!r} is not one of --dataset_names ({', '.join(names)})")
            out[name] = count
        else:
            out = {n: count for n in names}
    return out


def parse_concat(value: str, names: list[str]) -> dict[str, int]:
    """``paper`` (llava 3, llava_dial 2, others 1), ``N`` for every set, or ``name:N,...``."""
    if str(value).strip() == "paper":
        return {n: PAPER_COUNTS.get(n, 1) for n in names}
    got = parse_per_set(value, names, "--dataset_concatenate_samples", allow_all=False)
    return {n: (c if c is not None else PAPER_COUNTS.get(n, 1)) for n, c in got.items()}


def check_datasets(names: list[str], data_path: str | None) -> None:
    """Clear errors for unknown names and a missing data path, before anything is loaded."""
    import os

    if not names:
        raise ValueError("--dataset_names is empty")
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise ValueError(f"unknown data set(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(sorted(DATASETS))}")
    need = [n for n in names if n not in GENERATED]
    if need:
        if not data_path:
            raise ValueError(f"--data_path is required for {', '.join(need)} (only {', '.join(GENERATED)} needs none)")
        if not os.path.exists(data_path):
            raise FileNotFoundError(f"--data_path {data_path!r} does not exist (needed by {', '.join(need)})")


# -- building ---------------------------------------------------------------------------------
def _split_conversations(convs: list[Conversation], val_ratio: float, seed: int) -> tuple[list, list]:
    if val_ratio <= 0 or len(convs) < 2:
        return list(convs), []
    idx = list(range(len(convs)))
    random.Random(seed).shuffle(idx)
    n_val = min(len(convs) - 1, max(1, round(len(convs) * val_ratio)))
    val = sorted(idx[:n_val])
    train = sorted(idx[n_val:])
    return [convs[i] for i in train], [convs[i] for i in val]


def load_splits(names: list[str], data_path: str | None, counts: dict[str, int | None], val_ratio: float,
                seed: int, max_images: int, stats: DataStats) -> tuple[dict[str, list], dict[str, list]]:
    """name -> conversations, for train and validation. Generated sets use their own validation split
    (scenes disjoint from train); other sets hold out ``val_ratio`` of their conversations."""
    train, val = {}, {}
    for i, name in enumerate(names):
        n = counts.get(name)
        if name in GENERATED:
            n = n or SHAPES_DEFAULT_N
            st: dict = {}
            train[name] = load_dataset(name, data_path, split="train", n=n, seed=seed, max_images=max_images, stats=st)
            n_val = max(1, round(n * val_ratio)) if val_ratio > 0 else 0
            val[name] = load_dataset(name, data_path, split="validation", n=n_val, seed=seed,
                                     max_images=max_images) if n_val else []
        else:
            st = {}
            convs = load_dataset(name, data_path, max_images=max_images, stats=st)
            if n is not None and n < len(convs):
                keep = sorted(random.Random(seed + 7919 * i).sample(range(len(convs)), n))
                convs = [convs[j] for j in keep]
            train[name], val[name] = _split_conversations(convs, val_ratio, seed + i)
        for k, v in st.items():
            if k.startswith("skipped_"):
                stats.add(f"{name}/{k}", v)
        log.info("%s: %d train, %d validation conversations", name, len(train[name]), len(val[name]))
    return train, val


def named_counts(value: str) -> set[str]:
    """The set names that ``--dataset_samples`` gives a count of their own (``name:N``)."""
    return {part.rpartition(":")[0] for part in str(value).replace(" ", "").split(",") if ":" in part}


def oversample(train: dict[str, list], val: dict[str, list], counts: dict[str, int | None], seed: int,
               stats: DataStats) -> dict[str, list]:
    """A file set asked by name for more conversations than it holds (``jsonl:3000`` of 379) repeats
    its training share up to the count less its validation share: every conversation the same
    number of times, then a seeded sample of the rest. The validation share never repeats and never
    joins training. Runs after the image checks, so a bad image is counted once."""
    out = dict(train)
    for i, (name, n) in enumerate(counts.items()):
        convs = train.get(name) or []
        if name in GENERATED or n is None or not convs or n <= len(convs) + len(val.get(name, [])):
            continue
        whole, rest = divmod(n - len(val.get(name, [])), len(convs))
        extra = sorted(random.Random(seed + 104729 * (i + 1)).sample(range(len(convs)), rest))
        out[name] = convs * whole + [convs[j] for j in extra]
        stats.add(f"{name}/repeated", len(out[name]))
    return out


def check_images(split: dict[str, list[Conversation]], stats: DataStats, cache: dict) -> dict[str, list]:
    """Leave out conversations with a missing or corrupt image (each bad file logged once)."""
    out = {}
    for name, convs in split.items():
        if all(is_lazy(r) for c in convs for r in c.images):
            out[name] = convs
            continue
        kept, skipped = validate_images(convs, cache=cache, workers=2, open_fn=open_ref)
        if skipped:
            stats.add(f"{name}/skipped_bad_image", skipped)
        out[name] = kept
    return out


def render_samples(split: dict[str, list[Conversation]], template: Template, max_seq_len: int,
                   stats: DataStats) -> list[Sample]:
    """Render every packed conversation; cut to ``max_seq_len`` by dropping whole trailing rounds
    (skipped and counted if even the first round is too long). Tokens after the last answer are
    dropped too (they carry no loss)."""
    out = []

    def count(c):
        return len(template.render(c))

    for name, convs in split.items():
        for conv in convs:
            fitted = fit_to_length(conv, count, max_seq_len)
            if fitted is None:
                stats.add(f"{name}/skipped_too_long")
                continue
            if fitted is not conv:
                stats.add(f"{name}/cut_rounds", len(conv.rounds) - len(fitted.rounds))
            r = template.render(fitted)
            last = max((i for i, x in enumerate(r.labels) if x != IGNORE_INDEX), default=-1)
            if last < 1:
                stats.add(f"{name}/skipped_no_answer")
                continue
            end = last + 1
            out.append(Sample(r.input_ids[:end], r.is_image[:end], r.labels[:end], list(fitted.images), name))
    return out


def build_samples(names: list[str], data_path: str | None, *, template: Template, samples: str = "all",
                  concat: str = "paper", val_ratio: float = 0.1, seed: int = 0, max_images: int = 8,
                  max_seq_len: int = 4096) -> tuple[list[Sample], list[Sample], DataStats]:
    """(train samples, validation samples, counts of what was skipped and why)."""
    check_datasets(names, data_path)
    counts = parse_per_set(samples, names, "--dataset_samples")
    concat_counts = parse_concat(concat, names)
    stats = DataStats()
    train, val = load_splits(names, data_path, counts, val_ratio, seed, max_images, stats)
    cache: dict = {}
    train, val = check_images(train, stats, cache), check_images(val, stats, cache)
    named = named_counts(samples)
    train = oversample(train, val, {k: v for k, v in counts.items() if k in named}, seed, stats)
    train = pack(train, concat_counts, max_images=max_images, seed=seed)
    val = pack(val, concat_counts, max_images=max_images, seed=seed + 1)
    tr = render_samples(train, template, max_seq_len, stats)
    va = render_samples(val, template, max_seq_len, stats)
    stats.add("train_samples", len(tr))
    stats.add("val_samples", len(va))
    if not tr:
        raise ValueError("no training samples left after loading, image checks and length cuts: "
                         f"{stats.as_dict()}")
    return tr, va, stats
