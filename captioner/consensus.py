"""Consensus reranking: of the decoder's captions and the captions of similar photos, the one they agree on.

A retrieval model's datastore holds human captions of photos like the one being captioned. The VOTERS
captions retrieved first for it vote (the consensus reranking of Devlin et al. 2015, "Exploring Nearest
Neighbor Approaches for Image Captioning"): each candidate, the decoder's n-best and the voters themselves,
scores its mean similarity to the voters (a voter leaves itself out), and the decoder's captions get `lean`
on top, since they describe this photo and not a similar one. On everyday photos the voters often agree on
what the Flickr8k decoder does not know (a cup of coffee); on Flickr8k the decoder's captions usually win.
docs/RESULTS.md measures both.

Similarity is CIDEr's core: the mean over n = 1..4 of the cosines of tf-idf n-gram vectors (no length
penalty, no clipping). The document frequencies come from the whole datastore, counted when it is built and
stored hashed (NGRAM_FILE: BUCKETS idf values, uint8 in steps of 1/IDF_STEPS), so a rare n-gram that
many voters share weighs more than "a man is".
"""
from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from .vocab import tokenize

VOTERS = 25  # retrieved captions voting per photo, and candidates besides the decoder's
ORDERS = 4  # n-grams of 1 to 4 words
BUCKETS = 1 << 20  # hashed n-gram slots of the document-frequency table
IDF_STEPS = 20  # stored idf resolution: uint8 holds idf up to 12.75 (log of 344,000 captions)
NGRAM_FILE = "ngram_idf.npy"


def _bucket(gram: Sequence[str]) -> int:
    """A stable slot per n-gram (Python's hash() changes between runs)."""
    return zlib.crc32(" ".join(gram).encode()) & (BUCKETS - 1)


def _grams(words: Sequence[str]) -> Counter[tuple[int, int]]:
    """(order - 1, bucket) -> count of the caption's 1..ORDERS-grams."""
    return Counter((n - 1, _bucket(words[i:i + n])) for n in range(1, ORDERS + 1)
                   for i in range(len(words) - n + 1))


def count_idf(captions: Iterable[str]) -> np.ndarray:
    """The stored table: per bucket, log(captions / captions holding an n-gram of it), quantised to uint8."""
    df = np.zeros(BUCKETS, dtype=np.int64)
    total = 0
    for caption in captions:
        slots = np.fromiter({b for _, b in _grams(tokenize(caption))}, dtype=np.int64)
        np.add.at(df, slots, 1)
        total += 1
    idf = np.log(max(total, 1)) - np.log(np.maximum(df, 1))
    return np.clip(np.rint(idf * IDF_STEPS), 0, 255).astype(np.uint8)


def similarities(texts: Sequence[str], idf: np.ndarray) -> np.ndarray:
    """(n, n) CIDEr-style similarity (module docstring) of every pair of texts."""
    grams = [_grams(tokenize(t)) for t in texts]
    columns: dict[tuple[int, int], int] = {}
    for g in grams:
        for key in g:
            columns.setdefault(key, len(columns))
    if not columns:
        return np.zeros((len(texts), len(texts)))
    order = np.zeros(len(columns), dtype=np.int64)
    slot = np.zeros(len(columns), dtype=np.int64)
    for (n, b), j in columns.items():
        order[j], slot[j] = n, b
    weights = np.zeros((len(texts), len(columns)))
    for i, g in enumerate(grams):
        for key, count in g.items():
            weights[i, columns[key]] = count
    weights *= idf[slot].astype(np.float64) / IDF_STEPS
    total = np.zeros((len(texts), len(texts)))
    for n in range(ORDERS):
        w = weights[:, order == n]
        norm = np.linalg.norm(w, axis=1)
        dot = w @ w.T
        total += np.divide(dot, np.outer(norm, norm), out=np.zeros_like(dot), where=dot > 0)
    return total / ORDERS


def rerank(decoded: Sequence[str], voters: Sequence[str], idf: np.ndarray, lean: float) -> list[tuple[int, float]]:
    """(candidate, agreement) best first, over the decoder's captions (candidates 0..len(decoded) - 1) and
    the voters (the next ones): mean similarity to the voters, plus `lean` for the decoder's."""
    if not voters:
        return [(i, 0.0) for i in range(len(decoded))]
    sims = similarities(list(decoded) + list(voters), idf)[:, len(decoded):]
    scores = np.empty(len(decoded) + len(voters))
    scores[:len(decoded)] = sims[:len(decoded)].mean(axis=1) + lean
    own = sims[len(decoded):]
    others = max(len(voters) - 1, 1)
    scores[len(decoded):] = (own.sum(axis=1) - np.diag(own)) / others
    best = np.argsort(-scores, kind="stable")
    return [(int(i), float(scores[i])) for i in best]

