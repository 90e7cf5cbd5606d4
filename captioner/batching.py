"""Training batches: a split's captions encoded once, and the seeded order they are dealt in.

Training, the precision measurement and the learning-rate finder all read their batches here.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from .features import Prepared
from .objectives import Batch


class CaptionSet:
    """One split's images and their captions, encoded once up front.

    Batches are made of whole images with all their captions, so the decoder projects each image's
    features once for its ~5 captions instead of once per caption."""

    def __init__(self, prepared: Prepared, split: str) -> None:
        self.prepared = prepared
        self.rows = prepared.indices(split)  # feature rows of the split's images
        encoded = [[prepared.vocab.encode(c) for c in prepared.records[i].captions] for i in self.rows]
        if not self.rows:
            raise ValueError(f"{prepared.root}: the {split} split has no images with features")
        flat = [e for caps in encoded for e in caps]
        self.lengths = np.array([len(e) for e in flat])
        self.tokens = np.zeros((len(flat), self.lengths.max()), dtype=np.int64)
        for j, e in enumerate(flat):
            self.tokens[j, : len(e)] = e
        bounds = np.cumsum([0] + [len(caps) for caps in encoded])
        self.captions_of = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.image_lengths = np.array([self.lengths[c].mean() for c in self.captions_of])
        self.memory: np.ndarray | None = None  # (prepared rows, M) retrieved captions, for a retrieval decoder

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        """Image batches holding about batch_size captions."""
        per_image = len(self.lengths) / len(self.rows)
        return sortish_batches(self.image_lengths, max(1, round(batch_size / per_image)), seed, rank, world)

    def batch(self, images: list[int]) -> tuple[np.ndarray, Tensor, Tensor, Tensor]:
        """Feature rows of the images, and the index of each caption's image among those rows, and
        the captions longest first with their lengths."""
        caps = np.concatenate([self.captions_of[i] for i in images])
        owner = np.concatenate([np.full(len(self.captions_of[i]), k) for k, i in enumerate(images)])
        order = np.argsort(-self.lengths[caps], kind="stable")
        caps, owner = caps[order], owner[order]
        lengths = self.lengths[caps]
        rows = np.array([self.rows[i] for i in images])
        return (rows, torch.from_numpy(owner), torch.from_numpy(self.tokens[caps, : lengths[0]]),
                torch.from_numpy(lengths))

    def on_device(self, images: list[int], inputs: Callable[[np.ndarray], Tensor], device: torch.device,
                  teacher_forcing: float = 1.0) -> Batch:
        """The Batch of these images and their captions on `device`; `inputs` turns their feature rows
        into what the model takes (cached features, or images in stage 2)."""
        rows, owner, captions, lengths = self.batch(images)
        memory = torch.from_numpy(self.memory[rows]).to(device) if self.memory is not None else None
        return Batch(inputs(rows), rows, owner.to(device), captions.to(device), lengths.to(device), teacher_forcing,
                     memory)

    def features(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(self.prepared.features[rows].astype(np.float32))


def sortish_batches(lengths: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Shuffle, sort chunks of 50 batches by length, cut into batches, shuffle the batches.

    Batches hold items of similar (caption) length, so few steps run for a handful of stragglers,
    while the order stays random. The permutation depends only on the seed (derived from the epoch),
    so a resumed run sees the same batches; under DDP each rank takes every world-th batch.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(order), chunk):
        part = order[s:s + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    usable = len(batches) - len(batches) % world if world > 1 else len(batches)
    return batches[rank:usable:world]
