"""Tokenize once per node: the rendered training samples, cached on disk.

Rendering (the template's tokenization, with the bisection that cuts a long conversation to
``--max_seq_len``) is the slow part of building the samples, and every rank of a run used to do all
of it. Here local rank 0 of each node renders the packed conversations and writes the result to
``<cache>/token_index/<key>.safetensors`` (``visualchat.assets.cache_dir()``); the node's other
ranks wait for it and read it, and so does every later run on the node with the same inputs.

The key is a hash of everything the rendering depends on:

- the packed conversations themselves (system prompt, each round's question and answer, each
  image's cache key: a file's path, size and mtime, a generated scene's id; see
  :func:`visualchat_train.features.image_key`), so any change of the data, of the packing or of the image
  checks' outcome gives another key;
- the tokenizer (its full serialisation: vocabulary, merges, normaliser, added tokens), the
  template's version, ``K`` and token ids, and the source of the template and of the length cut;
- ``max_seq_len``.

Conversations whose images have no stable key (an in-memory image) or a tokenizer that cannot be
serialised are rendered on every rank, uncached, as before. The file holds only integer tensors and
JSON metadata (safetensors, nothing unpickled); image references are not stored: a sample records
which conversation it came from and how many of its images it kept, and takes them from the
conversations of this run.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
from typing import Any, Callable

import torch

log = logging.getLogger("visualchat_train.token_cache")

#: bump when the file layout or the meaning of a field changes
VERSION = 1


def _ref_key(ref: Any) -> str | None:
    from .features import image_key

    k = image_key(ref)
    if k is not None:
        return k
    if isinstance(ref, str):  # e.g. a missing file: its path is what the conversation says
        return "path:" + ref
    return None


def conversations_fingerprint(splits: list[dict[str, list]], h) -> bool:
    """Feed every conversation of ``splits`` (in order) into the hash ``h``; False if an image has no
    stable key (then nothing may be cached)."""
    for i, split in enumerate(splits):
        h.update(f"\0split{i}:{len(split)}".encode())
        for name, convs in split.items():
            h.update(f"\0set:{name}:{len(convs)}".encode())
            for conv in convs:
                h.update(b"\0conv\0" + str(conv.system).encode())
                for r in conv.rounds:
                    h.update(b"\0q\0" + str(r.question).encode() + b"\0a\0" + str(r.answer).encode())
                    for ref in r.images:
                        k = _ref_key(ref)
                        if k is None:
                            return False
                        h.update(b"\0i\0" + k.encode())
    return True


def tokenizer_fingerprint(tok) -> str | None:
    """A hash of the whole tokenizer, or None when it cannot be serialised."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode())
    elif hasattr(tok, "get_vocab"):
        try:
            h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
        except Exception:
            return None
    else:
        return None
    for attr in ("all_special_tokens", "all_special_ids", "bos_token_id", "eos_token_id", "pad_token_id",
                 "unk_token_id", "add_bos_token", "add_eos_token", "padding_side"):
        h.update(f"\0{attr}={getattr(tok, attr, None)!r}".encode())
    added = getattr(tok, "added_tokens_decoder", None) or {}
    h.update(repr(sorted((int(i), str(t), bool(getattr(t, "special", False))) for i, t in added.items())).encode())
    return h.hexdigest()


def _source_hash(*objs) -> str:
    h = hashlib.sha256()
    for o in objs:
        try:
            h.update(inspect.getsource(o).encode())
        except (OSError, TypeError):
            h.update(repr(o).encode())
    return h.hexdigest()


def cache_key(splits: list[dict[str, list]], template, max_seq_len: int, render_fn: Callable) -> str | None:
    """The key of the rendered ``splits``, or None when they cannot be cached."""
    import visualchat.template as template_module
    from visualchat_train.data import packing

    tok = tokenizer_fingerprint(template.tokenizer)
    if tok is None:
        return None
    h = hashlib.sha256(f"token-index-v{VERSION}|{max_seq_len}|{tok}".encode())
    h.update(f"|template v{getattr(template, 'version', '?')} k={template.k} image={template.image_token_id} "
             f"eos={template.eos_id} bos={template.bos_ids}".encode())
    h.update(_source_hash(template_module, packing.fit_to_length, render_fn).encode())
    if not conversations_fingerprint(splits, h):
        return None
    return h.hexdigest()[:32]


def index_path(key: str) -> str:
    from visualchat.assets import cache_dir

    return os.path.join(cache_dir(), "token_index", key + ".safetensors")


def _flat(split: dict[str, list]) -> list[tuple[str, Any]]:
    return [(name, c) for name, convs in split.items() for c in convs]


def _encode(rendered: list[list], origins: list[list[int]], conversations: list[int],
            counts: dict[str, int]) -> tuple[dict, dict]:
    """Tensors and metadata of the rendered samples; a sample names its conversation by position."""
    tensors: dict[str, torch.Tensor] = {}
    for i, (samples, conv_idx) in enumerate(zip(rendered, origins)):
        ids = [t for s in samples for t in s.input_ids]
        labels = [t for s in samples for t in s.labels]
        is_img = [bool(x) for s in samples for x in s.is_image]
        tensors[f"s{i}.conv"] = torch.tensor(conv_idx, dtype=torch.int64)
        tensors[f"s{i}.n_images"] = torch.tensor([len(s.images) for s in samples], dtype=torch.int64)
        tensors[f"s{i}.lengths"] = torch.tensor([len(s.input_ids) for s in samples], dtype=torch.int64)
        tensors[f"s{i}.input_ids"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"s{i}.labels"] = torch.tensor(labels, dtype=torch.int64)
        tensors[f"s{i}.is_image"] = torch.tensor(is_img, dtype=torch.bool)
    meta = {"version": str(VERSION), "splits": str(len(rendered)), "stats": json.dumps(counts),
            "conversations": json.dumps(conversations)}
    return tensors, meta


def _decode(splits: list[dict[str, list]], tensors: dict, meta: dict,
            Sample: type) -> tuple[list[list], dict[str, int]]:
    if meta.get("version") != str(VERSION) or int(meta.get("splits", -1)) != len(splits):
        raise ValueError("another version or number of splits")
    if json.loads(meta["conversations"]) != [len(_flat(s)) for s in splits]:
        raise ValueError("another number of conversations")
    out = []
    for i, split in enumerate(splits):
        flat = _flat(split)
        conv, n_img = tensors[f"s{i}.conv"].tolist(), tensors[f"s{i}.n_images"].tolist()
        lengths = tensors[f"s{i}.lengths"].tolist()
        ids, labels = tensors[f"s{i}.input_ids"].tolist(), tensors[f"s{i}.labels"].tolist()
        is_img = tensors[f"s{i}.is_image"].tolist()
        if sum(lengths) != len(ids) or len(ids) != len(labels) or len(ids) != len(is_img):
            raise ValueError("token arrays of different lengths")
        samples, at = [], 0
        for c, n, L in zip(conv, n_img, lengths):
            name, conversation = flat[c]
            images = conversation.images
            if n > len(images):
                raise ValueError(f"sample keeps {n} images of a conversation with {len(images)}")
            samples.append(Sample(ids[at:at + L], is_img[at:at + L], labels[at:at + L], list(images[:n]), name))
            at += L
        out.append(samples)
    return out, {k: int(v) for k, v in json.loads(meta["stats"]).items()}


def _write(path: str, tensors: dict, meta: dict) -> None:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def render_cached(splits: list[dict[str, list]], template, max_seq_len: int, stats,
                  render_fn: Callable, sample_type: type) -> list[list]:
    """``[render_fn(split, template, max_seq_len, stats) for split in splits]``, rendered by local
    rank 0 of each node (or read from an earlier run's index) and read by the node's other ranks.
    ``stats`` receives the same counts as an uncached render; ``sample_type`` is the class of the
    samples ``render_fn`` makes (``visualchat_train.samples.Sample``; passed in, so this module does not import
    the one that calls it)."""
    from . import dist as D

    def render() -> tuple[list[list], list[list[int]], dict[str, int]]:
        # one conversation at a time, so each sample's conversation is known (render_fn gives each
        # conversation at most one sample, and counts what it skips)
        part = type(stats)()
        rendered, origins = [], []
        for split in splits:
            samples, origin = [], []
            for j, (name, conv) in enumerate(_flat(split)):
                got = render_fn({name: [conv]}, template, max_seq_len, part)
                samples.extend(got)
                origin.extend([j] * len(got))
            rendered.append(samples)
            origins.append(origin)
        return rendered, origins, part.as_dict()

    def add(counts: dict[str, int]) -> None:
        for k, v in counts.items():
            stats.add(k, v)

    key = cache_key(splits, template, max_seq_len, render_fn)
    if key is None:
        rendered, _, counts = render()
        add(counts)
        return rendered
    path = index_path(key)
    mine = None
    if D.local_rank() == 0 and not os.path.isfile(path):
        mine = render()
        try:
            rendered, origins, counts = mine
            _write(path, *_encode(rendered, origins, [len(_flat(s)) for s in splits], counts))
            log.info("tokenized %d samples once for this node: %s", sum(len(r) for r in mine[0]), path)
        except (OSError, ValueError) as e:
            log.warning("could not write the token index %s: %s", path, e)
    D.barrier()
    if mine is not None:
        add(mine[2])
        return mine[0]
    try:
        rendered, counts = _decode(splits, *_read(path), sample_type)
        log.info("read the tokenized samples from %s", path)
    except Exception as e:  # unreadable or stale: render here, as without a cache
        log.warning("could not use the token index %s (%s); tokenizing on this rank", path, e)
        rendered, _, counts = render()
    add(counts)
    return rendered
