"""Benchmark (not a test): `captioner search` at library scale. Index build speed on real caption texts
(the Flickr8k token file's captions, embedded by MiniLM as `build_index` does), then query latency and
memory at 10k, 100k and 1M photos. Embedding a million captions would take hours here, so the large
tables are synthetic: random unit rows in the index's float16 format; ranking cost does not depend on
what the vectors say. A query's time includes embedding it.

    python scripts/bench/bench_search.py --captions ../shared/data/flickr8k/Flickr8k.token.txt
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from captioner.runtime import cpu_name
from captioner.search import BATCH, Images, nearest
from captioner.sentences import SentenceEncoder, load_sentence_encoder

QUERIES = ["two dogs on a beach", "a man rides a bike down a hill", "children playing in the snow",
           "a woman with a camera", "a boat on a lake at sunset"]


def median_seconds(run, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def time_queries(table: np.ndarray, query: np.ndarray, encode: SentenceEncoder, rounds: int) -> tuple[float, ...]:
    """Median seconds of ranking alone, of a whole query (embedding it, then ranking), and of ranking when
    every photo also has an image vector (the table again, as its image vectors: the cost is the same)."""
    queries = iter(QUERIES * rounds)
    images = Images(table, np.arange(len(table)))
    return (median_seconds(lambda: nearest(table, query, 10), rounds),
            median_seconds(lambda: nearest(table, encode([next(queries)])[0], 10), rounds),
            median_seconds(lambda: nearest(table, query, 10, images), rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", required=True, help="a Flickr-style token file (NAME#i<TAB>caption)")
    parser.add_argument("--n-build", type=int, default=2048, help="captions embedded to time the index build")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    print(f"{cpu_name()}, {torch.get_num_threads()} threads; "
          "float16 table, float16 product, nearest rescored in float32")
    encode = load_sentence_encoder()
    with open(args.captions, encoding="utf-8") as lines:
        texts = [line.split("\t", 1)[1].strip() for line in lines][:args.n_build]
    encode(texts[:BATCH])  # warm up
    start = time.perf_counter()
    for s in range(0, len(texts), BATCH):
        encode(texts[s:s + BATCH])
    build = len(texts) / (time.perf_counter() - start)
    print(f"index build: {build:.0f} captions/s ({len(texts)} captions, batches of {BATCH})")
    print("| photos | table MiB | query ms (median) | of which ranking ms | ranking with image vectors ms "
          "| peak RSS MiB (process, MiniLM included) |\n| ---: | ---: | ---: | ---: | ---: | ---: |")
    rng = np.random.default_rng(0)
    query = encode([QUERIES[0]])[0]
    for size in (int(s) for s in args.sizes.split(",")):
        table = np.empty((size, len(query)), dtype=np.float16)
        for start in range(0, size, 65536):  # made in blocks, so the peak is the table and not its float32 draft
            block = rng.standard_normal((min(65536, size - start), len(query)), dtype=np.float32)
            table[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
        ranking, total, mixed = time_queries(table, query, encode, args.rounds)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"| {size:,} | {table.nbytes / 2**20:.0f} | {1000 * total:.1f} | {1000 * ranking:.1f} | "
              f"{1000 * mixed:.1f} | {rss:.0f} |")


if __name__ == "__main__":
    main()
