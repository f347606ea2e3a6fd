"""Micro-batches for the trainer: :class:`Batcher` fixes which samples each rank's micro-batch ``g``
takes (a seeded permutation per epoch, so the order depends only on seed and step) and collates them
(cached features or preprocessed pixels); :func:`micro_batch_stream` runs the collation in DataLoader
workers ahead of the step when ``--data_workers`` > 0."""
from __future__ import annotations

import random
from typing import Any

import torch

from .samples import Sample


class Batcher:
    """Micro-batches from the sample stream: the order is a seeded permutation per epoch, and
    micro-batch ``g`` on rank ``r`` takes samples ``(g * world + r) * B ...`` of the stream, so the
    order depends only on (seed, step) and resuming needs nothing else."""

    def __init__(self, samples: list[Sample], micro: int, world: int, rank: int, seed: int,
                 features=None, encoder=None, device=torch.device("cpu")):
        self.samples = samples
        self.micro, self.world, self.rank, self.seed = micro, world, rank, seed
        self.features = features  # FeatureCache or None
        self.encoder = encoder
        self.device = device
        self._orders: dict[int, list[int]] = {}
        self._bad: set = set()

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            idx = list(range(len(self.samples)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(idx)
            self._orders = {epoch: idx}  # only the current epoch's order is kept
        return self._orders[epoch]

    def train_indices(self, micro_index: int) -> list[int]:
        n = len(self.samples)
        out = []
        for b in range(self.micro):
            j = (micro_index * self.world + self.rank) * self.micro + b
            out.append(self.order(j // n)[j % n])
        return out

    def micro_batch(self, micro_index: int, to_device: bool = True) -> dict[str, Any]:
        """Micro-batch ``micro_index`` of this rank, collated (images opened and preprocessed)."""
        return self.collate([self.samples[j] for j in self.train_indices(micro_index)], to_device=to_device)

    def collate(self, items: list[Sample], to_device: bool = True) -> dict[str, Any]:
        from visualchat.template import IGNORE_INDEX

        from .features import image_key, open_ref

        L = max(len(s) for s in items)
        B = len(items)
        pad = items[0].input_ids[0]
        ids = torch.full((B, L), pad, dtype=torch.long)
        is_img = torch.zeros(B, L, dtype=torch.bool)
        labels = torch.full((B, L), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.bool)
        feats, ims, concept_labels = [], [], []
        for i, s in enumerate(items):
            n = len(s)
            ids[i, :n] = torch.tensor(s.input_ids)
            is_img[i, :n] = torch.tensor(s.is_image)
            labels[i, :n] = torch.tensor(s.labels)
            mask[i, :n] = True
            for ref in s.images:
                concept_labels.append(labels_of(ref))
                key = image_key(ref) if self.features is not None else None
                if key is not None and self.features.has(key):
                    feats.append(self.features.get(key))
                else:
                    ims.append(open_ref(ref))
        # Right padding needs no key mask: every real position comes before every pad, so under causal
        # attention and MMCA no real query ever sees a pad key, and pads carry no labels.
        out = {"input_ids": ids, "is_image": is_img, "padding_mask": None, "labels": labels, "n_tokens": int(mask.sum())}
        if any(y is not None for y in concept_labels):  # per-image labels (--aux_loss); -100: unlabelled image
            width = max(len(y) for y in concept_labels if y is not None)
            out["image_labels"] = torch.tensor([y if y is not None else [IGNORE_INDEX] * width for y in concept_labels],
                                               dtype=torch.long)
        if feats and ims:
            raise RuntimeError("a batch mixes cached and uncached images; fill the feature cache first")
        if feats:
            out["image_feats"] = torch.stack(feats)
        elif ims:
            out["pixel_values"] = self.encoder.preprocess(ims)
        if not to_device:
            return out
        return to_device_batch(out, self.device)


def labels_of(ref: Any) -> list[int] | None:
    """An image's per-cell concept labels when its data set knows them (a shapes image: from its scene
    graph), else None."""
    from .features import is_lazy

    if not is_lazy(ref):
        return None
    from visualchat_train.data.shapes import concept_labels

    return concept_labels(ref.scene)


def to_device_batch(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batches ``first, first + 1, ...`` of one rank as a map-style data set: item ``i`` is
    :meth:`Batcher.micro_batch` ``(first + i)`` on the CPU, so a :class:`torch.utils.data.DataLoader`
    can open and preprocess images in worker processes ahead of the training step. The order stays the
    Batcher's (a distributed sampler keyed on seed and step: rank r takes its own share of every step,
    the same samples per step at any world size, and a resume needs only the step)."""

    def __init__(self, batcher: Batcher, first: int, count: int):
        self.batcher, self.first, self.count = batcher, first, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.batcher.micro_batch(self.first + i, to_device=False)


def micro_batch_stream(batcher: Batcher, first: int, count: int, workers: int = 0, prefetch: int = 2,
                       pin_memory: bool = False):
    """An iterator over this rank's micro-batches ``first ..< first + count``, in order. ``workers > 0``:
    a DataLoader with that many worker processes, each keeping ``prefetch`` micro-batches ready;
    0: collated in the training process (as the loop did before)."""
    if workers <= 0:
        return (batcher.micro_batch(first + i, to_device=False) for i in range(count))
    loader = torch.utils.data.DataLoader(
        MicroBatches(batcher, first, count), batch_size=None, shuffle=False, num_workers=workers,
        prefetch_factor=max(1, prefetch), persistent_workers=False, pin_memory=pin_memory)
    return iter(loader)
