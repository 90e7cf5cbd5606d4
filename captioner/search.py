"""`captioner search`: find the photos of a captioned library by describing them, offline.

The library is a bulk JSONL (`captioner caption LIBRARY/ --output captions.jsonl`). Each photo's text is
its best caption and its concepts ("a dog runs on the beach. dog, ball"); the MiniLM sentence encoder
(sentences.py) turns texts and the query into unit vectors, and photos rank by cosine.

`captioner serve --library captions.jsonl --photos LIBRARY/` opens the same index for the page's search box
and /api/search (`Library`).

Lines captioned by a model that ships an image embedder also carry the photo's own vector (bulk.py), in
MiniLM's space (contrastive pretraining trained it there), and the query's one MiniLM vector is compared
with both. A photo with a vector ranks by `(1 - IMAGE_WEIGHT) * cos(query, caption text) + IMAGE_WEIGHT
* image`, where `image = IMAGE_SCALE * cos(query, image vector) + IMAGE_SHIFT` is the image cosine put on
the caption cosine's scale (the same mean and spread over all query-photo pairs of the dev split); a
photo without one ranks by its caption cosine alone, as if its image agreed with its caption. Without
that calibration a library captioned partly before its model had an embedder would rank below caption
search alone, its photos with vectors pushed down by their lower raw cosines; with it, such a library
ranks between the two (docs/RESULTS.md, "Search over a captioned library", measures all three).

Words a photo was tagged with count as such: a one-word query ("cat", "coffee") that is one of a photo's
concepts or a word of its caption (or its plural or singular) adds MATCH_BONUS to its score, which puts
every such photo above every photo without it, ranked among themselves by the mix. Without it the image
vector's large share (0.9, chosen for sentence queries) ranked a photo captioned "a white cat" and tagged cat
16th of 300 for "cat". `--image-weight` (`weight`) sets that share per query. A file with several lines (a
photo captioned again after an edit, bulk.py) is found once, by its last line.

The vectors are cached beside the JSONL (NAME.jsonl.search.npy, float16, the caption texts';
NAME.jsonl.search-images.npz, the image vectors of the rows that have one and those rows; and
NAME.jsonl.search.json: the files, captions and concept words in row order and how many bytes of the JSONL
they cover). The JSONL only grows while a library is
captioned, so a later search embeds just the lines added since; a JSONL that no longer starts with the
covered bytes (rewritten, merged from shards) is embedded again from the top.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .atomic import replace_file
from .bulk import captioned_library, decode_vector, read_lines
from .sentences import SENTENCE_MODEL, SentenceEncoder

BATCH = 256  # texts per encoder call
# bound on a float16 cosine's error, relative (rounding the query and the result: 2 x 2^-11, with room to spare)
ROUGH = 4e-3
# The image vector's share of a photo's score where it has one, and the map of its cosine onto the caption
# cosine's scale; all three measured on Flickr8k's dev split (scripts/probes/search_recall.py --split val): the
# weight with the best recall@5 (sentence queries; one-word queries, measured too, are within 0.2 precision@10
# of their best weight at 0.9, docs/RESULTS.md "One-word queries"), the scale and shift that give the image
# cosines of all query-photo pairs the mean and standard deviation of the caption cosines.
IMAGE_WEIGHT = 0.9
IMAGE_SCALE = 1.173
IMAGE_SHIFT = 0.066
# added to the score of a photo a one-word query names exactly (a concept, or a word of its caption): more than
# the width of the mix's whole range (IMAGE_SHIFT -+ IMAGE_SCALE at weight 1, -1 to 1 at 0), so such photos
# come first, in their mixed order, whatever the weight
MATCH_BONUS = 2.5
WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")  # a word of a caption or query: letters and digits, "dog's" whole


@dataclass
class Images:
    """The image vectors of the rows that have one."""

    vectors: np.ndarray  # (M, D) float16 unit rows
    rows: np.ndarray  # (M,) int64, ascending: the Index row each belongs to


def no_images(dim: int = 0) -> Images:
    return Images(np.zeros((0, dim), dtype=np.float16), np.zeros(0, dtype=np.int64))


@dataclass
class Index:
    files: list[str]  # row i's photo, as the JSONL names it
    vectors: np.ndarray  # (N, D) float16 unit rows: the caption texts'
    images: Images = field(default_factory=no_images)
    captions: list[str] = field(default_factory=list)  # row i's best caption
    concepts: list[list[str]] = field(default_factory=list)  # row i's concept words
    _stale: np.ndarray | None = field(default=None, repr=False)
    _words: dict[str, list[int]] | None = field(default=None, repr=False)

    def stale(self) -> np.ndarray:
        """Rows a later row of the same file replaced (a photo captioned again), as a boolean mask."""
        if self._stale is None or len(self._stale) != len(self.files):
            last = {file: row for row, file in enumerate(self.files)}
            self._stale = np.ones(len(self.files), dtype=bool)
            self._stale[list(last.values())] = False
        return self._stale

    def rows_named(self, word: str) -> np.ndarray:
        """Rows whose concepts or caption words include `word` (any case, or its plural or singular); the
        word index is built on the first call and kept (a server answers many queries)."""
        if self._words is None:
            self._words = {}
            for row, (caption, concepts) in enumerate(zip(self.captions, self.concepts)):
                for w in set(words(caption)) | {c.lower() for c in concepts}:
                    self._words.setdefault(w, []).append(row)
        found = sorted({row for form in forms(word) for row in self._words.get(form, [])})
        return np.asarray(found, dtype=np.int64)


def words(text: str) -> list[str]:
    """A text's words, lowercased."""
    return WORD.findall(text.lower())


def forms(word: str) -> set[str]:
    """A query word and its plain English plural or singular: "cat" also finds "cats", "dishes" "dish"."""
    found = {word, word + "s", word + "es"}
    if word.endswith("s") and len(word) > 3:
        found.add(word[:-1])
    if word.endswith("es") and len(word) > 4:
        found.add(word[:-2])
    return found


def record_text(record: dict) -> str | None:
    """What a JSONL line says about its photo, or None for a line with an error instead of captions."""
    captions = record.get("captions")
    if not captions:
        return None
    words = [c["word"] for c in record.get("concepts", [])]
    return captions[0]["generated_text"] + (". " + ", ".join(words) if words else "")


def build_index(jsonl: str | Path, encoder: SentenceEncoder, log: Callable[[str], None] = print) -> Index:
    """The library's vectors, from the cache where it still matches the JSONL, the rest embedded (captions)
    or decoded (image vectors) now."""
    jsonl = Path(jsonl)
    meta_path, table_path = jsonl.with_name(jsonl.name + ".search.json"), jsonl.with_name(jsonl.name + ".search.npy")
    images_path = jsonl.with_name(jsonl.name + ".search-images.npz")
    files: list[str] = []
    captions: list[str] = []
    concepts: list[list[str]] = []
    vectors = np.zeros((0, 0), dtype=np.float16)
    images = no_images()
    covered = 0
    if meta_path.exists() and table_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta["model"] == SENTENCE_MODEL and meta["bytes"] <= jsonl.stat().st_size
                and "captions" in meta  # a cache from before captions were kept: made again
                and prefix_sha256(jsonl, meta["bytes"]) == meta["sha256"]
                and (cached := read_images(images_path, meta.get("images", 0))) is not None):
            files, vectors, images, covered = meta["files"], np.load(table_path), cached, meta["bytes"]
            captions, concepts = meta["captions"], meta["concepts"]
    texts: list[str] = []
    end, new_files, new_images, new_rows = covered, [], [], []
    # a half-written last line waits for the next search; the last line's end is read after the loop
    for end, _, record in read_lines(jsonl, start=covered):  # noqa: B007
        text = record_text(record)
        if text is not None:
            if "vector" in record:
                new_images.append(decode_vector(record["vector"]))
                new_rows.append(len(files) + len(texts))
            texts.append(text)
            new_files.append(record["file"])
            captions.append(record["captions"][0]["generated_text"])
            concepts.append([c["word"] for c in record.get("concepts", [])])
    if texts:
        log(f"search: embedding {len(texts)} new captions of {jsonl}")
        fresh = np.concatenate([encoder(texts[s:s + BATCH]) for s in range(0, len(texts), BATCH)]).astype(np.float16)
        vectors = np.concatenate([vectors, fresh]) if len(vectors) else fresh
        files = files + new_files
    if new_images:
        if any(len(v) != vectors.shape[1] for v in new_images):
            raise ValueError(f"{jsonl}: a line's image vector is not {vectors.shape[1]} values long, as the sentence "
                             f"encoder's ({SENTENCE_MODEL}) are; it was captioned for another search")
        stacked = np.stack(new_images)
        images = Images(np.concatenate([images.vectors, stacked]) if len(images.rows) else stacked,
                        np.concatenate([images.rows, np.asarray(new_rows, dtype=np.int64)]))
    if end != covered:
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        replace_file(table_path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
        if len(images.rows):
            packed = io.BytesIO()
            np.savez(packed, vectors=images.vectors, rows=images.rows)
            replace_file(images_path, lambda tmp: tmp.write_bytes(packed.getvalue()))
        meta = {"model": SENTENCE_MODEL, "bytes": end, "sha256": prefix_sha256(jsonl, end), "files": files,
                "images": len(images.rows), "captions": captions, "concepts": concepts}
        replace_file(meta_path, lambda tmp: tmp.write_text(json.dumps(meta) + "\n"))  # last: it names the tables
    return Index(files, vectors, images, captions, concepts)


def read_images(path: Path, count: int) -> Images | None:
    """The cached image vectors, or None when the file no longer holds the `count` the cache's json names
    (a crash between writing it and the json): then the library is read again from the top."""
    if not count:
        return no_images()
    if not path.exists():
        return None
    with np.load(path) as packed:
        images = Images(packed["vectors"], packed["rows"])
    return images if len(images.rows) == count else None


def prefix_sha256(path: Path, size: int) -> str:
    """sha256 of the file's first `size` bytes, read in chunks (a library's JSONL can be gigabytes)."""
    digest, left = hashlib.sha256(), size
    with open(path, "rb") as f:
        while left and (chunk := f.read(min(left, 1 << 20))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def mix(text: np.ndarray, image: np.ndarray, weight: float) -> np.ndarray:
    """A photo's score from its caption cosine and its image cosine (the module docstring)."""
    return (1 - weight) * text + weight * (IMAGE_SCALE * image + IMAGE_SHIFT)


def nearest(vectors: np.ndarray, query: np.ndarray, top: int, images: Images | None = None,
            weight: float = IMAGE_WEIGHT, bonus_rows: np.ndarray | None = None,
            exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the `top` rows nearest the unit `query`, best first (ties: the earlier row): the
    cosine with the float16 unit `vectors`, mixed with the image vector's cosine (`mix`) for the rows
    `images` has. Brute force in two passes: float16 matrix-vector products over the tables as they are
    stored (no float32 copy of a million rows), then the rows within ROUGH of the top-th rough score (times
    the mix's largest factor) scored again in float32, so the order is exact (a million photos: 0.08 s on 2 cores
    without image vectors, docs/BENCHMARKS.md). `bonus_rows` get MATCH_BONUS added; rows `exclude` (a
    boolean mask) are never returned."""
    top = min(top, len(vectors) - (int(exclude.sum()) if exclude is not None else 0))
    if top <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    mixed = images if images is not None and len(images.rows) > 0 else None  # None: text only
    table = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float16))
    query16 = torch.from_numpy(query.astype(np.float16))
    rough = (table @ query16).float().numpy()
    if mixed is not None:
        pictures = (torch.from_numpy(np.ascontiguousarray(mixed.vectors, dtype=np.float16)) @ query16).float().numpy()
        rough[mixed.rows] = mix(rough[mixed.rows], pictures, weight)
    bonus_rows = np.zeros(0, dtype=np.int64) if bonus_rows is None else bonus_rows
    rough[bonus_rows] += MATCH_BONUS
    if exclude is not None:
        rough[exclude] = -np.inf
    kth = np.partition(rough, len(rough) - top)[len(rough) - top]
    widest = max(1.0, 1 - weight + weight * IMAGE_SCALE) if mixed is not None else 1.0
    error = ROUGH * max(1.0, abs(float(kth))) * widest
    candidates = np.flatnonzero(rough >= kth - error)  # in row order
    exact = vectors[candidates].astype(np.float32) @ query.astype(np.float32)
    if mixed is not None:
        at = np.minimum(np.searchsorted(mixed.rows, candidates), len(mixed.rows) - 1)
        has = mixed.rows[at] == candidates
        exact[has] = mix(exact[has], mixed.vectors[at[has]].astype(np.float32) @ query.astype(np.float32), weight)
    exact[np.isin(candidates, bonus_rows)] += MATCH_BONUS
    best = np.argsort(-exact, kind="stable")[:top]
    return candidates[best], exact[best]


def search_rows(index: Index, encoder: SentenceEncoder, query: str, top: int = 10,
                weight: float = IMAGE_WEIGHT) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of the `top` photos nearest the query, best first: the cosine with their text, mixed
    with their image vector's where they have one (`weight`), MATCH_BONUS for a one-word query they are
    tagged or captioned with, each file once (its last row). An empty query raises ValueError."""
    if not query.strip():
        raise ValueError("the query is empty: say what to look for, e.g. \"two dogs on a beach\" or \"cat\"")
    if not 0 <= weight <= 1:
        raise ValueError(f"the image weight is {weight}; it is a share of the score, from 0 to 1")
    if not len(index.files):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    said = words(query)
    bonus = index.rows_named(said[0]) if len(said) == 1 else None
    return nearest(index.vectors, encoder([query])[0], top, index.images, weight, bonus, index.stale())


def search(index: Index, encoder: SentenceEncoder, query: str, top: int = 10,
           weight: float = IMAGE_WEIGHT) -> list[tuple[str, float]]:
    """The `top` photos nearest the query, best first, with their score (`search_rows`)."""
    rows, scores = search_rows(index, encoder, query, top, weight)
    return [(index.files[i], float(s)) for i, s in zip(rows, scores)]


@dataclass
class Library:
    """A captioned library opened for searching again and again (the server's): its index, each photo's best
    caption and concepts (what a hit shows), and the folder its paths are relative to."""

    index: Index
    records: dict[str, dict]  # file -> {"caption": ..., "concepts": [...]}
    photos: Path
    encoder: SentenceEncoder

    def find(self, query: str, top: int = 10) -> list[dict]:
        """The `top` photos nearest the query, best first: file, score, caption, concepts. A blank query finds
        nothing (the API refuses an empty one itself)."""
        if not query.strip():
            return []
        return [{"file": file, "score": round(score, 4), **self.records[file]}
                for file, score in search(self.index, self.encoder, query, top)
                if file in self.records]  # the index can hold a line the JSONL gained after it was read


def open_library(jsonl: str | Path, photos: str | Path, encoder: SentenceEncoder,
                 log: Callable[[str], None] = print) -> Library:
    """The library's index, built or brought up to date (build_index), and what each photo's line says."""
    jsonl, photos = captioned_library(jsonl, photos)
    records = {record["file"]: {"caption": record["captions"][0]["generated_text"],
                                "concepts": record.get("concepts", [])}
               for _, _, record in read_lines(jsonl) if record_text(record) is not None}
    return Library(build_index(jsonl, encoder, log), records, photos, encoder)
