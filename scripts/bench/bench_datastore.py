"""How far a caption datastore's vectors can shrink: for each width kept by PCA (int8), the share of the
exact float32 top-k neighbours it still finds for real photos, its size on disk and its search time.

    python scripts/bench/bench_datastore.py --sources ../shared/data/caption-corpus/coco-val2017.jsonl.gz \
        ../shared/data/caption-corpus/flickr30k.jsonl.gz ../shared/data/flickr8k/Flickr8k.token.txt \
        --photos ../shared/data/coco-dev/images --photos ../shared/data/flickr8k/images --max-photos 300

Embedding 171,000 captions with MiniLM takes about 15 minutes on 2 cores; --vectors caches them (float16 .npy).
Run with OMP_NUM_THREADS=1 for the one-core search time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from captioner.data import expand_inputs, load_image
from captioner.datastore import BATCH, build, caption_groups
from captioner.pipeline import Captioner


def replay(vectors: np.ndarray, n: int) -> Callable[[list[str]], np.ndarray]:
    """An encoder for build() that hands out the caption vectors computed once above, in order, instead of
    running MiniLM again for every size measured."""
    position = iter(range(n))
    return lambda texts: vectors[[next(position) for _ in texts]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--photos", action="append", required=True, help="folders of query photos")
    parser.add_argument("--max-photos", type=int, default=300, help="photos per folder")
    parser.add_argument("--dims", default="384,128,96,64,48")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--vectors", help="cache of the caption vectors (.npy, float16)")
    args = parser.parse_args()

    captions, _, _ = caption_groups(args.sources, args.split)
    cache = Path(args.vectors) if args.vectors else None
    if cache is not None and cache.exists():
        vectors = np.load(cache).astype(np.float32)
    else:
        from captioner.sentences import load_sentence_encoder

        encode = load_sentence_encoder()
        vectors = np.concatenate([encode(captions[i:i + BATCH]) for i in range(0, len(captions), BATCH)])
        if cache is not None:
            np.save(cache, vectors.astype(np.float16))
    if len(vectors) != len(captions):
        raise SystemExit(f"{cache}: {len(vectors)} vectors for {len(captions)} captions")

    captioner = Captioner.from_pretrained(device="cpu")
    paths = [p for folder in args.photos for p in expand_inputs([folder])[: args.max_photos]]
    with torch.inference_mode():
        queries = np.concatenate([captioner.embed([load_image(p) for p in paths[i:i + 32]])
                                  for i in range(0, len(paths), 32)])
    exact = queries @ vectors.T
    truth = np.argsort(-exact, axis=1)[:, : args.k]
    print(f"{len(captions):,} captions, {len(paths)} query photos, top {args.k}")
    print("| kept dims | size (MiB) | exact top-k found | cosine error (mean abs) | search ms / photo |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for dim in [int(d) for d in args.dims.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            store = build(args.sources, Path(tmp) / "ds", encoder=replay(vectors, len(captions)),
                          split=args.split, reduced_dim=dim, log=lambda s: None)
            size = sum(f.stat().st_size for f in (Path(tmp) / "ds").iterdir()) / 2**20
            found = store.search(queries, args.k)
            start = time.perf_counter()
            for q in queries[:100]:
                store.search(q[None], args.k)
            ms = (time.perf_counter() - start) * 10
        share = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(found.rows, truth)])
        error = np.abs(found.similarity - np.take_along_axis(exact, found.rows, axis=1)).mean()
        print(f"| {dim} | {size:.1f} | {100 * share:.1f}% | {error:.4f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
