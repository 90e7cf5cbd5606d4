"""CIDEr-D in process, fast enough to be a reward: many sampled captions scored per training step.

The scores are pycocoevalcap's CIDEr (which is CIDEr-D: tf-idf vectors of 1- to 4-grams, a candidate's
weight clipped at the reference's, a Gaussian length penalty with sigma 6, the mean over n, averaged
over references, times 10), but the document frequencies come from the references given once to
`CiderD`, typically the whole train split, instead of from whichever images happen to be scored.
Given the same references (those of the scored images), both agree to float rounding.

Everything about the references is worked out once: each n-gram becomes an integer key (16 bits per
word), the references' tf-idf weights, norms and lengths are stored in flat arrays, sorted so that a
batch of candidates meets its images' references through `np.searchsorted`. Scoring a batch is then a
few numpy operations over all its n-grams at once; only turning tokens into word ids loops in Python.
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np

ORDERS = 4  # n-grams of 1 to 4 words
_BITS = 16  # per word in an n-gram key: four words fill a uint64
_MAX_WORDS = 2**_BITS - 1  # word ids are 1.. (0 would make "x y" and "0 x y" the same key)

Tokens = Sequence[Hashable]  # one tokenised caption: words as strings or as vocabulary ids


def _ngrams(ids: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 1..4-grams of the rows of ids (N, T) (word ids >= 1, zero-padded after lengths (N,)):
    (row (M,), key (M,) uint64, order - 1 (M,)), with repeats, one entry per occurrence."""
    rows, keys, orders = [], [], []
    key = np.zeros(ids.shape, dtype=np.uint64)
    positions = np.arange(ids.shape[1])
    for n in range(1, ORDERS + 1):
        width = ids.shape[1] - n + 1
        if width <= 0:
            break
        # the n-gram starting at i extends the (n-1)-gram starting at i by the word at i + n - 1
        key = (key[:, :width] << np.uint64(_BITS)) | ids[:, n - 1:].astype(np.uint64)
        row, start = np.nonzero(positions[:width] + n <= lengths[:, None])
        rows.append(row)
        keys.append(key[row, start])
        orders.append(np.full(len(row), n - 1))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
    return np.concatenate(rows), np.concatenate(keys), np.concatenate(orders)


def _counts(rows: np.ndarray, keys: np.ndarray, orders: np.ndarray) -> tuple[np.ndarray, ...]:
    """Occurrences grouped into (row, key, order, count), sorted by row then key."""
    order = np.lexsort((keys, rows))
    rows, keys, orders = rows[order], keys[order], orders[order]
    first = np.ones(len(rows), dtype=bool)
    first[1:] = (rows[1:] != rows[:-1]) | (keys[1:] != keys[:-1])
    starts = np.flatnonzero(first)
    counts = np.diff(np.append(starts, len(rows)))
    return rows[starts], keys[starts], orders[starts], counts


def _penalty_length(lengths: np.ndarray) -> np.ndarray:
    """The length the Gaussian penalty compares: pycocoevalcap counts a caption's bigrams (words - 1)."""
    return np.maximum(lengths - 1, 0)


class CiderD:
    """CIDEr-D of candidate captions against fixed references, with document frequencies from them.

    references maps an image id to its tokenised reference captions (e.g. `vocab.tokenize` of each):
    every image counts as one document, as in pycocoevalcap.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[Tokens]], sigma: float = 6.0) -> None:
        if not references:
            raise ValueError("CiderD needs references of at least one image")
        self.sigma = sigma
        self._words: dict[Hashable, int] = {}
        self._image: dict[Hashable, int] = {}
        refs: list[list[int]] = []
        ref_image: list[int] = []
        for image_id, captions in references.items():
            if not captions:
                raise ValueError(f"image {image_id!r} has no references")
            self._image[image_id] = len(self._image)
            for caption in captions:
                refs.append(self._ids(caption, self._words, f"a reference of image {image_id!r}"))
                ref_image.append(self._image[image_id])
        ref_image_arr = np.array(ref_image)
        self.n_refs = np.bincount(ref_image_arr, minlength=len(self._image))
        self.first_ref = np.concatenate([[0], np.cumsum(self.n_refs)[:-1]])  # refs of an image are contiguous

        ids, lengths = self._pad(refs)
        if not lengths.any():
            raise ValueError("the references hold no words")
        ref, key, order, count = _counts(*_ngrams(ids, lengths))
        # document frequency: the number of images whose references hold the n-gram
        _, image_keys, _, _ = _counts(ref_image_arr[ref], key, order)
        self._keys, df = np.unique(image_keys, return_counts=True)  # sorted n-gram keys of the references
        self.log_documents = float(np.log(float(len(self._image))))
        self._idf = self.log_documents - np.log(np.maximum(df, 1.0))

        gram = np.searchsorted(self._keys, key)  # each reference n-gram's index into self._keys
        weight = count * self._idf[gram]
        self._ref_norm = np.sqrt(np.bincount(ref * ORDERS + order, weight**2, minlength=len(refs) * ORDERS)
                                 ).reshape(len(refs), ORDERS)
        self._ref_length = _penalty_length(lengths)
        # the references' n-gram entries sorted by (image, n-gram), so a candidate's n-gram finds the
        # entries of its own image's references with two binary searches
        joint = ref_image_arr[ref] * len(self._keys) + gram
        by_joint = np.argsort(joint, kind="stable")
        self._joint, self._entry_ref, self._entry_weight = joint[by_joint], ref[by_joint], weight[by_joint]

    @staticmethod
    def _ids(caption: Tokens, words: dict[Hashable, int], what: str) -> list[int]:
        if isinstance(caption, str):
            raise TypeError(f"{what} is a string; give its tokens (e.g. vocab.tokenize(caption))")
        ids = []
        for token in caption:
            i = words.get(token)
            if i is None:
                i = words[token] = len(words) + 1
                if i > _MAX_WORDS:
                    raise ValueError(f"CIDEr-D handles at most {_MAX_WORDS} distinct words")
            ids.append(i)
        return ids

    @staticmethod
    def _pad(captions: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        lengths = np.array([len(c) for c in captions], dtype=np.int64)
        ids = np.zeros((len(captions), max(1, int(lengths.max(initial=0)))), dtype=np.int64)
        for i, c in enumerate(captions):
            ids[i, : len(c)] = c
        return ids, lengths

    def score(self, image_ids: Sequence[Hashable], candidates: Sequence[Tokens]) -> np.ndarray:
        """CIDEr-D of each tokenised candidate against the references of the image beside it; an image
        may appear several times (k samples each). Returns (N,) float64, x10 as pycocoevalcap's."""
        if len(image_ids) != len(candidates):
            raise ValueError(f"{len(image_ids)} image ids for {len(candidates)} candidates")
        if not candidates:
            return np.zeros(0)
        try:
            image = np.array([self._image[i] for i in image_ids])
        except KeyError as err:
            raise KeyError(f"image {err.args[0]!r} is not among the references CiderD was built with") from None
        # words no reference uses get ids of their own for this call only: they match nothing, but each
        # must stay distinct to count its n-grams right
        words = dict(self._words)
        ids, lengths = self._pad([self._ids(c, words, f"candidate {j}") for j, c in enumerate(candidates)])
        cand, key, order, count = _counts(*_ngrams(ids, lengths))

        gram = np.minimum(np.searchsorted(self._keys, key), len(self._keys) - 1)
        known = self._keys[gram] == key
        # an n-gram no reference holds has document frequency 0, taken as 1 as pycocoevalcap does
        weight = count * np.where(known, self._idf[gram], self.log_documents)
        norm = np.sqrt(np.bincount(cand * ORDERS + order, weight**2, minlength=len(candidates) * ORDERS)
                       ).reshape(len(candidates), ORDERS)

        # every (candidate n-gram, same n-gram in a reference of the candidate's image) pair
        joint = image[cand[known]] * len(self._keys) + gram[known]
        lo = np.searchsorted(self._joint, joint, side="left")
        hi = np.searchsorted(self._joint, joint, side="right")
        repeats = hi - lo
        pair_entry = np.repeat(lo - np.cumsum(repeats) + repeats, repeats) + np.arange(repeats.sum())
        pair_cand = np.repeat(cand[known], repeats)
        ref_weight = self._entry_weight[pair_entry]
        clipped = np.minimum(np.repeat(weight[known], repeats), ref_weight) * ref_weight
        # per candidate, reference slot (0..refs of its image - 1) and order
        slots = int(self.n_refs.max())
        slot = self._entry_ref[pair_entry] - self.first_ref[image[pair_cand]]
        dot = np.bincount((pair_cand * slots + slot) * ORDERS + np.repeat(order[known], repeats), clipped,
                          minlength=len(candidates) * slots * ORDERS).reshape(len(candidates), slots, ORDERS)

        ref = self.first_ref[image][:, None] + np.arange(slots)  # (N, slots) reference index
        valid = np.arange(slots) < self.n_refs[image][:, None]
        ref = np.where(valid, ref, 0)
        denominator = norm[:, None, :] * self._ref_norm[ref]
        cosine = np.divide(dot, denominator, out=np.zeros(dot.shape), where=denominator != 0)
        delta = (_penalty_length(lengths)[:, None] - self._ref_length[ref]).astype(np.float64)
        penalty = np.exp(-(delta**2) / (2 * self.sigma**2))
        per_ref = cosine.mean(axis=2) * penalty * valid
        return 10.0 * per_ref.sum(axis=1) / self.n_refs[image]
