"""`captioner search`: find the photos of a captioned library by describing them, offline.

The library is a bulk JSONL (`captioner caption LIBRARY/ --output captions.jsonl`). Each photo's text is
its best caption and its concepts ("a dog runs on the beach. dog, ball"); the MiniLM sentence encoder
(sentences.py) turns texts and the query into unit vectors, and photos rank by cosine.

`captioner serve --library captions.jsonl --photos LIBRARY/` opens the same index for the page's search box
and /api/search (`Library`).

The vectors are cached beside the JSONL (NAME.jsonl.search.npy, float16, and NAME.jsonl.search.json: the
files in row order and how many bytes of the JSONL they cover). The JSONL only grows while a library is
captioned, so a later search embeds just the lines added since; a JSONL that no longer starts with the
covered bytes (rewritten, merged from shards) is embedded again from the top.
"""
from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import replace_file
from .bulk import captioned_library, read_lines
from .sentences import SENTENCE_MODEL, SentenceEncoder

BATCH = 256  # texts per encoder call
# bound on a float16 cosine's error, relative (rounding the query and the result: 2 x 2^-11; 3e-4 measured)
ROUGH = 4e-3


@dataclass
class Index:
    files: list[str]  # row i's photo, as the JSONL names it
    vectors: np.ndarray  # (N, D) float16 unit rows


def record_text(record: dict) -> str | None:
    """What a JSONL line says about its photo, or None for a line with an error instead of captions."""
    captions = record.get("captions")
    if not captions:
        return None
    words = [c["word"] for c in record.get("concepts", [])]
    return captions[0]["generated_text"] + (". " + ", ".join(words) if words else "")


def build_index(jsonl: str | Path, encoder: SentenceEncoder, log: Callable[[str], None] = print) -> Index:
    """The library's vectors, from the cache where it still matches the JSONL, the rest embedded now."""
    jsonl = Path(jsonl)
    meta_path, table_path = jsonl.with_name(jsonl.name + ".search.json"), jsonl.with_name(jsonl.name + ".search.npy")
    files: list[str] = []
    vectors = np.zeros((0, 0), dtype=np.float16)
    covered = 0
    if meta_path.exists() and table_path.exists():
        meta = json.loads(meta_path.read_text())
        if (meta["model"] == SENTENCE_MODEL and meta["bytes"] <= jsonl.stat().st_size
                and prefix_sha256(jsonl, meta["bytes"]) == meta["sha256"]):
            files, vectors, covered = meta["files"], np.load(table_path), meta["bytes"]
    end, texts, new_files = covered, [], []
    for end, _, record in read_lines(jsonl, start=covered):  # a half-written last line waits for the next search
        text = record_text(record)
        if text is not None:
            texts.append(text)
            new_files.append(record["file"])
    if texts:
        log(f"search: embedding {len(texts)} new captions of {jsonl}")
        fresh = np.concatenate([encoder(texts[s:s + BATCH]) for s in range(0, len(texts), BATCH)]).astype(np.float16)
        vectors = np.concatenate([vectors, fresh]) if len(vectors) else fresh
        files = files + new_files
    if end != covered:
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        replace_file(table_path, lambda tmp: tmp.write_bytes(buffer.getvalue()))
        meta = {"model": SENTENCE_MODEL, "bytes": end, "sha256": prefix_sha256(jsonl, end), "files": files}
        replace_file(meta_path, lambda tmp: tmp.write_text(json.dumps(meta) + "\n"))  # last: it names the table
    return Index(files, vectors)


def prefix_sha256(path: Path, size: int) -> str:
    """sha256 of the file's first `size` bytes, read in chunks (a library's JSONL can be gigabytes)."""
    digest, left = hashlib.sha256(), size
    with open(path, "rb") as f:
        while left and (chunk := f.read(min(left, 1 << 20))):
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def nearest(vectors: np.ndarray, query: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows and cosines of the `top` rows of the float16 unit `vectors` nearest the unit `query`, best first
    (ties: the earlier row). Brute force in two passes: a float16 matrix-vector product over the table as it
    is stored (no float32 copy of a million rows), then the rows within ROUGH of the top-th rough cosine
    scored again in float32, so the order is exact (a million photos: 0.16 s here, docs/BENCHMARKS.md)."""
    top = min(top, len(vectors))
    if top <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    table = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float16))
    rough = (table @ torch.from_numpy(query.astype(np.float16))).float().numpy()
    kth = np.partition(rough, len(rough) - top)[len(rough) - top]
    candidates = np.flatnonzero(rough >= kth - ROUGH * max(1.0, abs(float(kth))))  # in row order
    exact = vectors[candidates].astype(np.float32) @ query.astype(np.float32)
    best = np.argsort(-exact, kind="stable")[:top]
    return candidates[best], exact[best]


def search(index: Index, encoder: SentenceEncoder, query: str, top: int = 10) -> list[tuple[str, float]]:
    """The `top` photos whose text is nearest the query, best first, with their cosine."""
    if not len(index.files):
        return []
    rows, scores = nearest(index.vectors, encoder([query])[0], top)
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
        """The `top` photos nearest the query, best first: file, score, caption, concepts."""
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
