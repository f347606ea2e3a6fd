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

from visualchat_train.data import DATASETS, load_dataset
from visualchat_train.data.packing import PAPER_COUNTS, fit_to_length, pack
from visualchat_train.data.validate import validate_images

from .config import TrainConfig
from .features import is_lazy, open_ref

log = logging.getLogger("visualchat_train.samples")

#: Data sets that need no ``--data_path`` (generated).
GENERATED = ("shapes", "shapes_dense", "shapes_varied")
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


#: What ``--over_max_images`` may be: ``cut`` keeps the sample within the limit (trailing rounds go;
#: MIMIC-IT frames are spread evenly), ``drop`` leaves it out (the original's preprocessing; the paper).
OVER_MAX_IMAGES = ("cut", "drop")
#: What ``--missing_image`` may be, for sets whose images are looked up in an index (MIMIC-IT SD, SN,
#: TVC, VST): ``skip_sample`` or ``drop_image`` (leave just that image out, as the original did).
MISSING_IMAGE = ("skip_sample", "drop_image")
#: Sets that take ``on_missing_image``.
INDEXED_IMAGE_SETS = ("otter_mimicit_sd", "otter_mimicit_sn", "otter_mimicit_tvc", "otter_mimicit_vst")


def parse_draw(value: Any, flag: str, allow_all: bool) -> int | str | None:
    """``random`` / ``all`` (None) / a positive count, for the blend's draws."""
    v = str(value).strip()
    if v == "random":
        return "random"
    if v == "all" and allow_all:
        return None
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{flag}: expected 'random'{', all' if allow_all else ''} or a count >= 1, got {value!r}")
    return n


def loader_options(name: str, *, over_max_images: str = "cut", missing_image: str = "skip_sample",
                   blend_llava_per_image: Any = 1, blend_cgd_questions: Any = "all",
                   skip_bad_lines: bool = False) -> dict:
    """The options that data set ``name``'s loader takes from the data flags."""
    if over_max_images not in OVER_MAX_IMAGES:
        raise ValueError(f"--over_max_images must be one of {', '.join(OVER_MAX_IMAGES)}, got {over_max_images!r}")
    if missing_image not in MISSING_IMAGE:
        raise ValueError(f"--missing_image must be one of {', '.join(MISSING_IMAGE)}, got {missing_image!r}")
    opts: dict = {}
    if name in INDEXED_IMAGE_SETS:
        opts["on_missing_image"] = "drop" if missing_image == "drop_image" else "skip"
    if name == "llava_otter_blend":
        opts["llava_per_image"] = parse_draw(blend_llava_per_image, "--blend_llava_per_image", allow_all=False)
        opts["cgd_questions"] = parse_draw(blend_cgd_questions, "--blend_cgd_questions", allow_all=True)
    if name == "jsonl" and skip_bad_lines:
        opts["skip_bad_lines"] = True
    return opts


def _load_limited(name: str, data_path: str | None, max_images: int, over_max_images: str, opts: dict,
                  st: dict) -> list[Conversation]:
    """Load one set; with ``over_max_images="drop"`` the loader keeps every image and a conversation
    with more than ``max_images`` (after any missing image was dropped) is left out and counted."""
    if over_max_images == "cut":
        return load_dataset(name, data_path, max_images=max_images, stats=st, **opts)
    convs = load_dataset(name, data_path, max_images=None, stats=st, **opts)
    kept = [c for c in convs if len(c.images) <= max_images]
    if len(kept) < len(convs):
        st["skipped_too_many_images"] = st.get("skipped_too_many_images", 0) + len(convs) - len(kept)
        st["loaded"] = len(kept)
    return kept


def load_splits(names: list[str], data_path: str | None, counts: dict[str, int | None], val_ratio: float,
                seed: int, max_images: int, stats: DataStats, *, over_max_images: str = "cut",
                options: dict[str, dict] | None = None) -> tuple[dict[str, list], dict[str, list]]:
    """name -> conversations, for train and validation. Generated sets use their own validation split
    (scenes disjoint from train); other sets hold out ``val_ratio`` of their conversations.
    ``options``: name -> extra loader options (see :func:`loader_options`)."""
    train, val = {}, {}
    options = options or {}
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
            convs = _load_limited(name, data_path, max_images, over_max_images, options.get(name, {}), st)
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


IMAGE_CHECKS = ("node", "every_rank")


def check_index_path(keys: list[str]) -> str:
    """The on-disk result of checking the images whose cache keys are ``keys`` (a change of any file,
    its size or mtime, gives another file)."""
    import hashlib
    import os

    from visualchat.assets import cache_dir

    h = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()
    return os.path.join(cache_dir(), "image_checks", f"{h[:24]}.json")


def prefill_checks(convs: list[Conversation], cache: dict) -> None:
    """Check the images of ``convs`` once per node: local rank 0 opens each image (or reads the result
    of an earlier run on this node) and writes ``{image key: error or null}``; the other ranks of the
    node wait, then read it. The results go into ``cache`` (reference -> error or None), so
    :func:`validate_images` opens nothing more. Images without a stable key are left to it."""
    import json
    import os

    from . import dist as D
    from .features import image_key

    refs, keys = [], []
    for c in convs:
        for r in c.images:
            if r in cache:  # checked already in this run (another split or set)
                continue
            k = image_key(r)
            if k is not None:
                refs.append(r)
                keys.append(k)
    if not refs:
        return
    path = check_index_path(list(set(keys)))
    fresh = False
    if D.local_rank() == 0 and not os.path.isfile(path):
        local: dict = {}  # validate_images logs each bad image once, here
        validate_images([_one_image_conv(r) for r in dict.fromkeys(refs)], cache=local, workers=2, open_fn=open_ref)
        results = {k: local.get(r) for r, k in zip(refs, keys)}
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(results, f)
            os.replace(tmp, path)
        except OSError as e:
            log.warning("could not write the image check index %s: %s", path, e)
        fresh = True
    D.barrier()
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return  # no shared result (e.g. a read-only cache): validate_images checks on this rank
    if not fresh and D.rank() == 0:
        from visualchat_train.data.validate import describe_ref

        for r, k in dict(zip(refs, keys)).items():
            if results.get(k):
                log.warning("skipping conversations with bad image %s: %s (checked earlier on this node: %s)",
                            describe_ref(r), results[k], path)
    for r, k in zip(refs, keys):
        if k in results:
            cache[r] = results[k]


def _one_image_conv(ref) -> Conversation:
    from visualchat.template import Round

    return Conversation(rounds=[Round(question="", answer="", images=[ref])])


def check_images(split: dict[str, list[Conversation]], stats: DataStats, cache: dict,
                 mode: str = "every_rank") -> dict[str, list]:
    """Leave out conversations with a missing or corrupt image (each bad file logged once).
    ``mode="node"``: each image is opened once per node, the result cached on disk
    (:func:`prefill_checks`); ``"every_rank"``: every rank opens every image."""
    if mode not in IMAGE_CHECKS:
        raise ValueError(f"--image_check must be one of {', '.join(IMAGE_CHECKS)}, got {mode!r}")
    out = {}
    for name, convs in split.items():
        if all(is_lazy(r) for c in convs for r in c.images):
            out[name] = convs
            continue
        if mode == "node":
            prefill_checks(convs, cache)
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


def debug_text(sample: Sample, template: Template) -> str:
    """One training sample as the model sees it: the prompt decoded token run by token run, each image
    slot shown as ``<Image k: N tokens>`` (k = its number in the conversation), the tokens that carry
    loss between ``[[`` and ``]]``, and the image references in slot order."""
    tok = template.tokenizer
    decode = getattr(tok, "decode", None)

    def text(ids: list[int]) -> str:
        if decode is not None:
            return decode(ids)
        return "".join(chr(i) for i in ids)  # a character tokenizer (tests)

    parts: list[str] = []
    i, n, image = 0, len(sample), 0
    while i < n:
        if sample.is_image[i]:
            j = i
            while j < n and sample.is_image[j] and j - i < template.k:
                j += 1
            image += 1
            parts.append(f"<Image {image}: {j - i} tokens>")
            i = j
            continue
        labelled = sample.labels[i] != IGNORE_INDEX
        j = i
        while j < n and not sample.is_image[j] and (sample.labels[j] != IGNORE_INDEX) == labelled:
            j += 1
        chunk = text(sample.input_ids[i:j])
        parts.append(f"[[{chunk}]]" if labelled else chunk)
        i = j
    from visualchat_train.data.validate import describe_ref

    head = [f"data set: {sample.source}", f"tokens: {len(sample)}, with loss: {sample.n_labels}, images: {len(sample.images)}"]
    head += [f"Image {k}: {describe_ref(r)}" for k, r in enumerate(sample.images, 1)]
    return "\n".join(head) + "\n\n--- rendered (loss-bearing tokens in [[ ]]) ---\n" + "".join(parts) + "\n"


def dump_debug_samples(samples: list[Sample], template: Template, path: str, per_set: int = 3) -> int:
    """Write the first ``per_set`` samples of each data set (as trained, in file order) to
    ``path/<set>_<i>.txt`` (see :func:`debug_text`); returns how many were written."""
    import os

    os.makedirs(path, exist_ok=True)
    seen: Counter = Counter()
    for s in samples:
        if seen[s.source] >= per_set:
            continue
        with open(os.path.join(path, f"{s.source or 'data'}_{seen[s.source]}.txt"), "w", encoding="utf-8") as f:
            f.write(debug_text(s, template))
        seen[s.source] += 1
    return sum(seen.values())


def build_samples(names: list[str], data_path: str | None, *, template: Template, samples: str = "all",
                  concat: str = "paper", val_ratio: float = 0.1, seed: int = 0, max_images: int = 8,
                  max_seq_len: int = 4096, concat_draw: str = "exact", over_max_images: str = "cut",
                  missing_image: str = "skip_sample", blend_llava_per_image: Any = 1,
                  blend_cgd_questions: Any = "all", skip_bad_lines: bool = False, image_check: str = "every_rank",
                  conversations_out: dict | None = None) -> tuple[list[Sample], list[Sample], DataStats]:
    """(train samples, validation samples, counts of what was skipped and why).

    ``concat_draw``: ``exact`` packs the ``concat`` count of conversations per sample, ``random`` a
    random 1..count (the original's); ``over_max_images``, ``missing_image``, the blend's draws and
    ``skip_bad_lines``: see :func:`loader_options`; ``image_check``: see :func:`check_images`. ``conversations_out``, if given, receives the packed
    training conversations per set (name -> list, in the order of the returned samples' sources)."""
    check_datasets(names, data_path)
    counts = parse_per_set(samples, names, "--dataset_samples")
    concat_counts = parse_concat(concat, names)
    opts = {n: loader_options(n, over_max_images=over_max_images, missing_image=missing_image,
                              blend_llava_per_image=blend_llava_per_image, blend_cgd_questions=blend_cgd_questions,
                              skip_bad_lines=skip_bad_lines) for n in names}
    stats = DataStats()
    train, val = load_splits(names, data_path, counts, val_ratio, seed, max_images, stats,
                             over_max_images=over_max_images, options=opts)
    cache: dict = {}
    train, val = check_images(train, stats, cache, image_check), check_images(val, stats, cache, image_check)
    named = named_counts(samples)
    train = oversample(train, val, {k: v for k, v in counts.items() if k in named}, seed, stats)
    train = pack(train, concat_counts, max_images=max_images, seed=seed, draw=concat_draw)
    val = pack(val, concat_counts, max_images=max_images, seed=seed + 1, draw=concat_draw)
    for name, convs in train.items():
        stats.add(f"{name}/packed_samples", len(convs))
    if conversations_out is not None:
        conversations_out.update(train)
    from .token_cache import render_cached  # tokenized once per node, cached (visualchat_train/token_cache.py)

    tr, va = render_cached([train, val], template, max_seq_len, stats, render_samples, Sample)
    stats.add("train_samples", len(tr))
    stats.add("val_samples", len(va))
    if not tr:
        raise ValueError("no training samples left after loading, image checks and length cuts: "
                         f"{stats.as_dict()}")
    return tr, va, stats


def build_samples_from_config(cfg: TrainConfig, names: list[str], template: Template,
                              conversations_out: dict | None = None):
    """:func:`build_samples` with the data settings of a run's :class:`TrainConfig`."""
    return build_samples(
        names, cfg.data_path, template=template, samples=cfg.dataset_samples,
        concat=cfg.dataset_concatenate_samples, val_ratio=cfg.val_ratio, seed=cfg.seed,
        max_images=cfg.max_images_per_sample, max_seq_len=cfg.max_seq_len, concat_draw=cfg.concatenate_draw,
        over_max_images=cfg.over_max_images, missing_image=cfg.missing_image,
        blend_llava_per_image=cfg.blend_llava_per_image, blend_cgd_questions=cfg.blend_cgd_questions,
        skip_bad_lines=cfg.skip_bad_lines, image_check=cfg.image_check, conversations_out=conversations_out)
