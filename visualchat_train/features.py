"""Opening images and caching the frozen encoder's features on disk.

The encoder is frozen (unless ``--vision_lora_rank``), so its output for an image never changes
during a run: it is computed once per image and stored as
``<root>/<encoder key>/<image key>.safetensors``. The encoder key hashes the encoder's spec and its
weights; the image key is ``shapes-v<SHAPES_VERSION>-<scene id>-<size>`` for a shapes scene in the
plain drawing (``...-<size>-d<drawing id>`` in a varied one: its own features), a hash
of path + size + mtime for a file, a hash of the data for a base64 image.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import logging
import os
from typing import Any, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from visualchat.images import ImageError, open_image

log = logging.getLogger("visualchat_train.features")

#: fewest images per worker process for ``FeatureCache.fill`` to start a pool
MIN_PER_WORKER = 64


def is_lazy(ref: Any) -> bool:
    return hasattr(ref, "load") and hasattr(ref, "scene")


def open_ref(ref: Any):
    """An image reference (path, ``base64:`` string, shapes LazyImage, PIL image) as an RGB PIL image;
    raises :class:`visualchat.images.ImageError` when it cannot be opened."""
    if is_lazy(ref):
        return ref.load().convert("RGB")
    if hasattr(ref, "image_ref"):  # e.g. visualchat_train.data.b64index.Base64Slice: read from its file when opened
        ref = ref.image_ref()
    return open_image(ref)


def image_key(ref: Any) -> str | None:
    """A stable cache key for ``ref``, or None if it cannot be cached (e.g. an in-memory image)."""
    if is_lazy(ref):
        from visualchat_train.data.shapes import SHAPES_VERSION

        drawing = getattr(ref, "drawing", None)
        return f"shapes-v{SHAPES_VERSION}-{ref.scene.id}-{ref.size}" + (f"-d{drawing.id}" if drawing else "")
    if hasattr(ref, "cache_key"):  # a Base64Slice: its file, place and length (never reads the data)
        try:
            return "b64slice-" + ref.cache_key()
        except OSError:
            return None
    if isinstance(ref, str):
        if ref.startswith("base64:"):
            return "b64-" + hashlib.sha1(ref.encode()).hexdigest()
        try:
            st = os.stat(ref)
        except OSError:
            return None
        h = hashlib.sha1(f"{os.path.abspath(ref)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
        return "file-" + h
    return None


def encoder_key(encoder) -> str:
    """Hash of the encoder's spec and weights (so a changed encoder never reads stale features)."""
    h = hashlib.sha256()
    try:
        h.update(encoder.spec().encode())
    except Exception:  # an encoder built from a config has no spec
        h.update(type(encoder).__name__.encode())
    from .zero3 import state_items  # a ZeRO-3 encoder's tensors gathered one at a time (collective)

    for name, t in state_items(encoder):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return f"{encoder.name}-{h.hexdigest()[:16]}"


class FeatureCache:
    """Features ``[K, d_vis]`` per image key, stored as float16 (or float32) safetensors files."""

    def __init__(self, root: str, encoder, dtype: torch.dtype = torch.float16):
        self.dir = os.path.join(root, encoder_key(encoder))
        self.dtype = dtype
        os.makedirs(self.dir, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key + ".safetensors")

    def has(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def get(self, key: str) -> torch.Tensor:
        return load_file(self.path(key))["f"].float()

    def put(self, key: str, feats: torch.Tensor) -> None:
        from visualchat.checkpoint import write_atomic

        data = {"f": feats.detach().cpu().to(self.dtype).contiguous()}
        write_atomic(self.dir, os.path.basename(self.path(key)), lambda tmp: save_file(data, tmp))

    def fill(self, encoder, refs: Iterable[Any], batch_size: int = 16, rank: int = 0, world: int = 1,
             progress: bool = True, workers: int = 1) -> dict[str, str]:
        """Compute the features of every ``ref`` not cached yet (this rank's share of them), opening
        (or drawing) the images in ``workers`` processes when there are many to do; the encoder runs
        in this process. Returns ``{image key: error}`` for the images that could not be opened."""
        todo, seen = [], set()
        for ref in refs:
            k = image_key(ref)
            if k is None or k in seen:
                continue
            seen.add(k)
            if not self.has(k):
                todo.append((k, ref))
        todo = todo[rank::world]
        from .zero3 import is_partitioned

        if is_partitioned(encoder):  # every forward of a ZeRO-3 encoder is collective: all ranks in step
            return fill_in_lockstep(self, encoder, todo, batch_size, progress)
        bad: dict[str, str] = {}
        if not todo:
            return bad
        # ranks of one run fill disjoint shares; separate runs (CA and MMCA side by side) take turns,
        # and the second computes only what the first did not
        with self._fill_lock() if world == 1 else contextlib.nullcontext():
            todo = [(k, ref) for k, ref in todo if not self.has(k)]
            if todo:
                self._compute(encoder, todo, bad, batch_size, progress, workers)
        return bad

    @contextlib.contextmanager
    def _fill_lock(self):
        """An exclusive lock on this cache folder for as long as one process fills it (POSIX only;
        elsewhere no lock, and two runs may compute the same features, which is only wasted time)."""
        try:
            import fcntl
        except ImportError:
            yield
            return
        with open(os.path.join(self.dir, ".fill.lock"), "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("another run is filling the feature cache %s; waiting for it", self.dir)
                fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _compute(self, encoder, todo: list, bad: dict[str, str], batch_size: int, progress: bool,
                 workers: int = 1) -> None:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(todo), desc="caching image features", unit="img", dynamic_ncols=True)
        # a pool costs each worker a fresh interpreter (spawn: safe beside CUDA and threads), so it only
        # pays for itself on a long list
        pool = None
        if workers > 1 and len(todo) >= MIN_PER_WORKER * workers:
            import multiprocessing

            pool = multiprocessing.get_context("spawn").Pool(workers)
            opened = pool.imap(_try_open, (ref for _, ref in todo), chunksize=8)
        else:
            opened = map(_try_open, (ref for _, ref in todo))
        try:
            chunk, ims = [], []
            for i, (k, (im, err)) in enumerate(zip((k for k, _ in todo), opened)):
                if err is not None:
                    bad[k] = err
                else:
                    chunk.append(k)
                    ims.append(im)
                if len(ims) == batch_size or i == len(todo) - 1:
                    if ims:
                        for key, f in zip(chunk, encode(encoder, ims)):
                            self.put(key, f)
                    if bar is not None:
                        bar.update(i + 1 - bar.n)
                    chunk, ims = [], []
        finally:
            if pool is not None:
                pool.terminate()
            if bar is not None:
                bar.close()


def _try_open(ref: Any):
    """(RGB image, None), or (None, error text) for an image that cannot be opened (picklable, for a pool)."""
    try:
        return open_ref(ref), None
    except ImageError as e:
        return None, str(e)


@torch.no_grad()
def encode(encoder, images: Sequence) -> torch.Tensor:
    """PIL images -> ``[n, K, d_vis]`` float32 on the CPU."""
    return encoder.encode(list(images)).float().cpu()


def fill_in_lockstep(cache, encoder: torch.nn.Module, todo: list, batch_size: int = 16, progress: bool = False) -> dict[str, str]:
    """``FeatureCache.fill`` for a partitioned encoder: this rank's ``todo`` ((key, ref) pairs) in
    batches, every rank running as many forwards as the rank with the most (a rank with none left
    encodes one blank image, to take part in the gathers). Returns ``{image key: error}``."""
    from . import dist as D
    from .zero3 import gathered_forward

    todo = [(k, ref) for k, ref in todo if not cache.has(k)]
    mine = math.ceil(len(todo) / batch_size)
    rounds = max(D.all_gather_object(mine)) if D.world_size() > 1 else mine
    bad: dict[str, str] = {}
    if rounds == 0:
        return bad
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="caching image features (ZeRO-3 encoder)", unit="img", dynamic_ncols=True)
    p = next(encoder.parameters())
    try:
        with gathered_forward(encoder), torch.no_grad():
            for i in range(rounds):
                keys, ims = [], []
                for k, ref in todo[i * batch_size:(i + 1) * batch_size]:
                    im, err = _try_open(ref)
                    if err is not None:
                        bad[k] = err
                    else:
                        keys.append(k)
                        ims.append(im)
                if ims:
                    for k, f in zip(keys, encode(encoder, ims)):
                        cache.put(k, f)
                else:
                    s = encoder.image_size
                    encoder(torch.zeros(1, 3, s, s, dtype=p.dtype, device=p.device))
                if bar is not None:
                    bar.update(min(len(todo), (i + 1) * batch_size) - bar.n)
    finally:
        if bar is not None:
            bar.close()
    return bad
