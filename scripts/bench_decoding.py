"""Time greedy and beam search per image on the CPU with a full-size attention decoder.

Random weights and features: the decoder never emits <end>, so every search runs to max_length,
the worst case. Usage: python scripts/bench_decoding.py [--threads 2] [--batch 32] [--profile]
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from captioner.decoders import AttentionDecoder
from captioner.decoding import beam_search, greedy


def per_image_ms(run: Callable[[], object], batch: int, repeats: int) -> float:
    """Best of `repeats` timings after a warm-up run, in ms per image."""
    run()
    best = min(_timed(run) for _ in range(repeats))
    return 1000 * best / batch


def _timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table for beam 5")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    decoder = AttentionDecoder(3000, 1280, 512, 512, 512).eval()
    features = torch.randn(args.batch, 49, 1280)
    with torch.inference_mode():
        ms = per_image_ms(lambda: greedy(decoder, features, args.max_length), args.batch, args.repeats)
        print(f"greedy: {ms:.2f} ms/image")
        for k in (3, 5):
            ms = per_image_ms(lambda: beam_search(decoder, features, k, args.max_length), args.batch, args.repeats)
            print(f"beam {k}: {ms:.2f} ms/image")
        if args.profile:
            with torch.profiler.profile() as prof:
                beam_search(decoder, features, 5, args.max_length)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
