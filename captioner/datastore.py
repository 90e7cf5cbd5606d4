"""The caption datastore: human captions and their sentence vectors, searched with an image's vector.

A model that ships an image embedder (retrieval.safetensors) puts each photo in the MiniLM sentence
encoder's space, so the captions nearest a photo are one matrix product away, with no sentence encoder
at inference. A retrieval-augmented decoder (models/retrieval.py) reads those neighbours while it writes;
swapping the datastore swaps the words and style it draws on, without training.

A datastore folder, written atomically:

    datastore.json     {"format": "captioner-datastore", "version": 1, "sentence_model": ..., "dim": 384,
                        "reduced_dim": 96, "count": N, "offset": float, "sources": [...]}
    captions.txt.gz    one caption a line, in row order
    groups.npy         (N,) int32: the photo each caption describes (rows of one photo share it)
    group_names.txt.gz one "source:image" a line, indexed by groups.npy: leave-one-out retrieval for
                       training excludes a photo's own captions by it
    projection.npy     (dim, reduced_dim) float32: the principal directions of the caption vectors
    vectors.npy        (N, reduced_dim) int8: each caption's vector minus the mean, on those directions,
                       divided by `scale` per row
    scales.npy         (N,) float16
    naming.npz         the rows of the captions naming each concept word (CaptionIndex)
    ngram_idf.npy      the captions' n-gram document frequencies, hashed (consensus.py)

A query q (a unit vector of `dim`) scores caption i as q.mean + (q @ projection) . vectors[i] * scales[i]:
its cosine with the caption vector, up to what PCA drops and int8 rounds (docs/RESULTS.md measures
how much that changes the neighbours).
"""
from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import read_folder, replace_folder
from .consensus import BUCKETS, NGRAM_FILE, count_idf
from .data import DatasetError, read_entries
from .sentences import SENTENCE_MODEL, SentenceEncoder

FORMAT, VERSION = "captioner-datastore", 1
REDUCED_DIM = 96  # PCA width kept: docs/RESULTS.md, "The datastore's size"
NAMING_FILE = "naming.npz"  # the rows of the captions naming each concept word, found when the datastore is built
BATCH = 512  # captions per sentence-encoder call


class DatastoreError(ValueError):
    """A datastore that is missing, malformed, or made for another model; the message names it."""


@dataclass
class Neighbours:
    """Per query, the k nearest captions, nearest first."""

    rows: np.ndarray  # (n, k) int64 datastore rows
    similarity: np.ndarray  # (n, k) float32 cosine
    texts: list[list[str]]


class CaptionIndex:
    """Which captions name a word (as a whole word: no letter or digit on either side), found once per word and
    process, 5-25 ms over 171,000 captions, or read from NAMING_FILE where `build` stored the concept words'."""

    def __init__(self, captions: list[str], known: dict[str, np.ndarray] | None = None) -> None:
        self.captions = captions
        self.known = dict(known or {})
        self._text = ""  # every caption lower-cased, one a line, with each line's start: made on first use
        self._starts = np.zeros(0, dtype=np.int64)

    def rows_naming(self, word: str) -> np.ndarray:
        if word not in self.known:
            if not self._text:
                self._text = "\n".join(self.captions).lower()
                self._starts = np.cumsum([0] + [len(c) + 1 for c in self.captions[:-1]])
            text, n, found = self._text, len(word), []
            at = text.find(word)
            while at >= 0:
                before = text[at - 1] if at else " "
                after = text[at + n] if at + n < len(text) else " "
                if not before.isalnum() and not after.isalnum():
                    found.append(at)
                at = text.find(word, at + 1)
            self.known[word] = np.unique(np.searchsorted(self._starts, found, side="right") - 1).astype(np.int64)
        return self.known[word]


class Datastore:
    """Captions, their photo groups and their reduced int8 vectors (the module docstring)."""

    def __init__(self, captions: list[str], groups: np.ndarray, group_names: list[str], projection: np.ndarray,
                 mean: np.ndarray, vectors: np.ndarray, scales: np.ndarray, meta: dict,
                 path: Path | None = None, naming: dict[str, np.ndarray] | None = None,
                 idf: np.ndarray | None = None) -> None:
        self.captions, self.groups, self.group_names = captions, groups, group_names
        self.projection, self.mean, self.meta, self.path = projection, mean.astype(np.float32), meta, path
        # float32, scaled once, one column per caption (reduced_dim x N x 4 bytes: 66 MB for 171,000 captions
        # at 96): a (n, reduced_dim) x (reduced_dim, N) product reads it in order (8 queries: 1.7x faster than rows).
        # Transposed while int8, then widened: a quarter of the bytes move out of order (about twice as fast)
        self.table = np.ascontiguousarray(vectors.T).astype(np.float32)
        self.table *= scales.astype(np.float32)[None, :]
        self.dim = int(meta["dim"])
        self.index = CaptionIndex(captions, naming)  # which captions name a word: the concept ranking's lookups
        self._idf = idf

    @property
    def idf(self) -> np.ndarray:
        """The captions' hashed n-gram idf (consensus.py): stored, or counted on first use for a datastore
        built before it was."""
        if self._idf is None:
            self._idf = count_idf(self.captions)
        return self._idf

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the datastore"

    def check_query(self, dim: int, sentence_model: str = SENTENCE_MODEL) -> None:
        """Refuse queries of another width or sentence encoder, naming the datastore."""
        if self.meta.get("sentence_model") != sentence_model:
            raise DatastoreError(f"{self.name}: captions embedded with {self.meta.get('sentence_model')!r}, but the "
                                 f"model's image vectors are in {sentence_model!r}'s space; rebuild it with "
                                 f"`captioner datastore build`")
        if dim != self.dim:
            raise DatastoreError(f"{self.name}: {self.dim}-dimensional caption vectors, but the model's image "
                                 f"vectors have {dim}; rebuild it with `captioner datastore build`")

    def scores(self, queries: np.ndarray) -> np.ndarray:
        """(n, dim) unit queries -> (n, N) float32 cosines with every caption (approximate, see above)."""
        queries = np.asarray(queries, dtype=np.float32)
        out = (queries @ self.projection) @ self.table
        out += (queries @ self.mean)[:, None]
        return out

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[int | None] | None = None,
               boosts: Sequence[Sequence[tuple[np.ndarray, float]]] | None = None) -> Neighbours:
        """The k nearest captions of each unit query (n, dim), exact over the stored vectors; `exclude[i]`
        (a group id, or None) leaves out every caption of that photo: leave-one-out for training. `boosts[i]`,
        (rows, amount) pairs, ranks those rows as if that much nearer to query i; the cosines are returned."""
        if queries.ndim != 2:
            raise ValueError(f"expected (n, {self.dim}) query vectors, got shape {tuple(queries.shape)}")
        self.check_query(queries.shape[1])
        k = min(k, len(self))
        cosines = self.scores(queries)
        scores = cosines.copy() if boosts else cosines
        for i, pairs in enumerate(boosts or ()):
            for rows, amount in pairs:
                scores[i, rows] += amount
        if exclude is not None:
            for i, group in enumerate(exclude):
                if group is not None and group >= 0:
                    scores[i, self.groups == group] = -np.inf
        # torch's top-k: 2x faster than numpy's partition and sort over 8 rows of 171,000 scores
        rows = torch.from_numpy(scores).topk(max(k, 0), dim=1).indices.numpy()
        similarity = np.take_along_axis(cosines, rows, axis=1)
        return Neighbours(rows, similarity, [[self.captions[j] for j in row] for row in rows])

    def groups_by_image(self) -> dict[str, int]:
        """Image name (a group name without its "source:") -> its group: whose captions leave-one-out
        retrieval leaves out for that photo."""
        return {name.partition(":")[2]: i for i, name in enumerate(self.group_names)}


def caption_groups(sources: Sequence[str | Path], split: str = "",
                   log: Callable[[str], None] = print) -> tuple[list[str], list[str], list[str]]:
    """Every caption of the caption files (any format `prepare` reads, gzip too) as (captions, their
    "source:image" group names, distinct group names in first-seen order). `split` keeps only the
    entries of that split where a file has splits (the Flickr8k token file: train)."""
    captions, groups = [], []
    for source in sources:
        fmt, file, _, entries, problems = read_entries(source)
        stem = Path(file).name.split(".")[0]
        kept = 0
        for image, texts, entry_split, where in entries:
            if split and entry_split and entry_split != split:
                continue
            for text in texts:
                if not isinstance(text, str):
                    raise DatasetError(f"{where}: caption is not a string: {text!r}")
                text = " ".join(text.split())
                if text:
                    captions.append(text)
                    groups.append(f"{stem}:{image}")
                    kept += 1
        log(f"{file}: {kept:,} captions ({fmt})" + "".join(f"; {p}" for p in problems))
    if not captions:
        raise DatasetError(f"no captions in {', '.join(map(str, sources))}")
    return captions, groups, list(dict.fromkeys(groups))


def reduce(vectors: np.ndarray, reduced_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PCA to reduced_dim and int8 per row: (projection (D, d), mean (D,), int8 (N, d), float16 scales (N,))."""
    mean = vectors.mean(axis=0)
    centred = vectors - mean
    reduced_dim = min(reduced_dim, vectors.shape[1])
    # the top eigenvectors of the covariance: the directions the captions differ along most
    values, basis = np.linalg.eigh(centred.T @ centred)
    projection = basis[:, np.argsort(-values)[:reduced_dim]].astype(np.float32)
    low = centred @ projection
    scales = np.abs(low).max(axis=1) / 127.0
    scales = np.maximum(scales, 1e-4).astype(np.float16)  # float16 keeps no smaller normal number
    quantised = np.clip(np.rint(low / scales.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return projection, mean.astype(np.float32), quantised, scales


def build(sources: Sequence[str | Path], output: str | Path, encoder: SentenceEncoder | None = None,
          split: str = "", reduced_dim: int = REDUCED_DIM, log: Callable[[str], None] = print) -> Datastore:
    """Embed every caption of the sources with MiniLM and write a datastore folder at `output`."""
    from tqdm import tqdm

    from .concepts import concept_table

    captions, groups, names = caption_groups(sources, split, log)
    if encoder is None:
        from .sentences import load_sentence_encoder
        encoder = load_sentence_encoder()
    parts = [encoder(captions[i:i + BATCH]) for i in tqdm(range(0, len(captions), BATCH), desc="embedding",
                                                           unit="batch", leave=False)]
    vectors = np.concatenate(parts).astype(np.float32)
    projection, mean, quantised, scales = reduce(vectors, reduced_dim)
    index = {n: i for i, n in enumerate(names)}
    group_ids = np.array([index[g] for g in groups], dtype=np.int32)
    meta = {"format": FORMAT, "version": VERSION, "sentence_model": SENTENCE_MODEL, "dim": int(vectors.shape[1]),
            "reduced_dim": int(projection.shape[1]), "count": len(captions), "mean": mean.tolist(),
            "sources": [str(s) for s in sources], "split": split}

    def write(folder: Path) -> None:
        (folder / "datastore.json").write_text(json.dumps(meta) + "\n")
        (folder / "captions.txt.gz").write_bytes(gzip.compress("\n".join(captions).encode() + b"\n", mtime=0))
        (folder / "group_names.txt.gz").write_bytes(gzip.compress("\n".join(names).encode() + b"\n", mtime=0))
        np.save(folder / "groups.npy", group_ids)
        np.save(folder / "projection.npy", projection)
        np.save(folder / "vectors.npy", quantised)
        np.save(folder / "scales.npy", scales)
        index = CaptionIndex(captions)
        write_naming(folder, {word: index.rows_naming(word) for word in concept_table().vocabulary})
        np.save(folder / NGRAM_FILE, count_idf(captions))

    replace_folder(output, write)
    log(f"{output}: {len(captions):,} captions of {len(names):,} photos, {meta['reduced_dim']}-d int8")
    return load_datastore(output)


def write_naming(folder: Path, naming: dict[str, np.ndarray]) -> None:
    """NAMING_FILE: per word, the rows of the captions naming it (CaptionIndex), as one array and offsets."""
    words = sorted(naming)
    offsets = np.cumsum([0] + [len(naming[w]) for w in words]).astype(np.int64)
    rows = np.concatenate([naming[w] for w in words]).astype(np.int32) if words else np.zeros(0, np.int32)
    with open(folder / NAMING_FILE, "wb") as f:
        np.savez(f, words=np.array(words, dtype=str), offsets=offsets, rows=rows)


def load_datastore(path: str | Path) -> Datastore:
    """A datastore folder; a missing or malformed one is a DatastoreError naming it."""
    path = Path(path)
    if not (path / "datastore.json").is_file():
        raise DatastoreError(f"{path}: not a caption datastore (no datastore.json); make one with "
                             f"`captioner datastore build CAPTION_FILES... --output {path}`")
    return read_folder(path, lambda folder: _read(folder, path))


def _read(folder: Path, path: Path) -> Datastore:
    meta = json.loads((folder / "datastore.json").read_text())
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int):
        raise DatastoreError(f"{path / 'datastore.json'}: not a caption datastore file")
    if meta["version"] > VERSION:
        raise DatastoreError(f"{path / 'datastore.json'}: datastore version {meta['version']} is newer than this "
                             f"captioner reads ({VERSION}); upgrade captioner")
    try:
        captions = gzip.decompress((folder / "captions.txt.gz").read_bytes()).decode().split("\n")[:-1]
        names = gzip.decompress((folder / "group_names.txt.gz").read_bytes()).decode().split("\n")[:-1]
        groups, projection = np.load(folder / "groups.npy"), np.load(folder / "projection.npy")
        vectors, scales = np.load(folder / "vectors.npy"), np.load(folder / "scales.npy")
    except (OSError, ValueError, EOFError) as err:
        raise DatastoreError(f"{path}: a datastore file is missing or damaged: {err}") from err
    count = meta["count"]
    if not (len(captions) == len(groups) == len(vectors) == len(scales) == count) or \
            projection.shape != (meta["dim"], meta["reduced_dim"]) or vectors.shape[1:] != (meta["reduced_dim"],):
        raise DatastoreError(f"{path}: its files disagree with datastore.json ({count} captions, "
                             f"{meta['dim']} -> {meta['reduced_dim']} dimensions)")
    naming = None
    if (folder / NAMING_FILE).is_file():  # optional: a datastore built before it scans on first use instead
        try:
            with np.load(folder / NAMING_FILE) as saved:
                words, offsets, rows = saved["words"].tolist(), saved["offsets"], saved["rows"].astype(np.int64)
        except (OSError, ValueError, KeyError) as err:
            raise DatastoreError(f"{path / NAMING_FILE}: damaged: {err}") from err
        naming = {w: rows[offsets[i]:offsets[i + 1]] for i, w in enumerate(words)}
    idf = None
    if (folder / NGRAM_FILE).is_file():  # optional as well: counted on first use without it
        try:
            idf = np.load(folder / NGRAM_FILE)
        except (OSError, ValueError) as err:
            raise DatastoreError(f"{path / NGRAM_FILE}: damaged: {err}") from err
        if idf.shape != (BUCKETS,) or idf.dtype != np.uint8:
            raise DatastoreError(f"{path / NGRAM_FILE}: expected {BUCKETS} uint8 values, got {idf.shape} {idf.dtype}")
    return Datastore(captions, groups, names, projection, np.array(meta["mean"], dtype=np.float32), vectors,
                     scales, meta, path, naming, idf)
