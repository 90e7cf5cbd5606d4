"""Nearest-neighbour caption retrieval (Devlin et al. 2015), the non-learned floor for every model number.

Each query image borrows the captions of its k most similar training images (cosine on pooled encoder
features) and keeps the one that agrees most with the others: the consensus caption describes what the
neighbours have in common rather than the quirks of a single one.
"""
from __future__ import annotations

from collections.abc import Sequence
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from .vocab import tokenize

MAX_N = 4


def nearest_neighbour_captions(
    train_features: np.ndarray,
    train_captions: list[list[str]],
    query_features: np.ndarray,
    k: int = 25,
    batch_size: int = 256,
) -> list[str]:
    """The consensus caption among the captions of each query's k nearest training images.

    Features are one vector per image (N, C), e.g. mean-pooled feature maps; float16 is fine, the maths
    runs in float32. Ties go to the candidate from the more similar image.
    """
    if len(train_features) != len(train_captions) or not len(train_captions):
        raise ValueError("need one list of captions per training feature row, and at least one row")
    if any(not captions for captions in train_captions):
        raise ValueError("every training image needs at least one caption")
    train = F.normalize(torch.as_tensor(np.asarray(train_features, dtype=np.float32)), dim=1)
    queries = F.normalize(torch.as_tensor(np.asarray(query_features, dtype=np.float32)), dim=1)
    k = min(k, len(train))
    ngrams = _NgramVectors(train_captions)
    flat = [caption for captions in train_captions for caption in captions]
    chosen: list[str] = []
    for start in range(0, len(queries), batch_size):
        neighbours = (queries[start : start + batch_size] @ train.T).topk(k, dim=1).indices.numpy()
        chosen += [flat[c] for c in ngrams.consensus(neighbours)]
    return chosen


class _NgramVectors:
    """CIDEr-style tf-idf vectors of 1..4-grams for every training caption, stored flat for numpy.

    Each n-gram order is L2-normalised on its own, so a dot product of two captions is the sum of their
    per-order cosines (CIDEr without its length penalty and clipping). idf counts training images, as
    CIDEr counts reference sets, so n-grams every image shares ("a", "in a") weigh nothing.
    """

    def __init__(self, train_captions: Sequence[Sequence[str]]) -> None:
        ids: dict[str, int] = {}
        per_caption: list[list[int]] = []  # n-gram ids of each caption, one per occurrence
        image_of: list[int] = []
        for image, captions in enumerate(train_captions):
            for caption in captions:
                tokens = tokenize(caption)
                windows = (zip(*(tokens[i:] for i in range(n))) for n in range(1, MAX_N + 1))
                grams = [" ".join(words) for window in windows for words in window]
                per_caption.append([ids.setdefault(g, len(ids)) for g in grams])
                image_of.append(image)
        order = np.array([g.count(" ") + 1 for g in ids], dtype=np.int64)  # n of each n-gram id
        size = len(ids)
        lengths = np.array([len(found) for found in per_caption])
        occurrences = np.repeat(np.arange(len(per_caption)), lengths) * size
        occurrences += np.fromiter(chain.from_iterable(per_caption), dtype=np.int64, count=lengths.sum())
        # One entry per distinct (caption, n-gram), sorted by caption; weight = term count x idf.
        keys, counts = np.unique(occurrences, return_counts=True)
        owner, gram = np.divmod(keys, size)
        # Distinct (image, n-gram) pairs; np.sort beats np.unique's hashing (numpy 2.4) ten times here.
        pairs = np.sort(np.array(image_of)[owner] * size + gram)
        in_images = pairs[np.diff(pairs, prepend=-1) != 0] % size
        idf = np.log(len(train_captions) / np.bincount(in_images, minlength=size))
        weight: np.ndarray = counts * idf[gram]
        block = owner * (MAX_N + 1) + order[gram]
        norm = np.sqrt(np.bincount(block, weights=weight**2))[block]
        weight /= np.where(norm > 0, norm, 1.0)

        self.size, self.gram, self.weight = size, gram, weight
        self.caption_start = np.searchsorted(owner, np.arange(len(per_caption) + 1))
        self.image_start = np.cumsum([0] + [len(captions) for captions in train_captions])
        self.self_similarity = np.bincount(owner, weights=weight**2, minlength=len(per_caption))

    def consensus(self, neighbours: np.ndarray) -> np.ndarray:
        """For each row of neighbour image ids, the flat id of the caption closest to all the others.

        A candidate's mean similarity to the other m - 1 candidates is (x . sum - x . x) / (m - 1): one
        pass over the n-gram entries against the per-query sum instead of all candidate pairs (m is the
        same for every candidate of a query, so the division is left out).
        """
        rows, k = neighbours.shape
        image_owner, caption = _ranges(self.image_start, neighbours.ravel())
        query = image_owner // k
        entry_owner, entry = _ranges(self.caption_start, caption)
        gram, weight = self.gram[entry], self.weight[entry]
        _, slot = np.unique(query[entry_owner] * self.size + gram, return_inverse=True)
        total = np.bincount(slot, weights=weight)
        agreement = np.bincount(entry_owner, weights=weight * total[slot], minlength=len(caption))
        score = agreement - self.self_similarity[caption]
        best = np.full(rows, -np.inf)
        np.maximum.at(best, query, score)
        winners = np.flatnonzero(score == best[query])
        _, first = np.unique(query[winners], return_index=True)
        return caption[winners[first]]


def _ranges(starts: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated ranges starts[i]..starts[i+1] for each i in `index`, with the position in `index`
    each element came from."""
    lengths = starts[index + 1] - starts[index]
    owner = np.repeat(np.arange(len(index)), lengths)
    offset = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return owner, starts[index][owner] + offset
