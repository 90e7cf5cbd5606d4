"""Benchmark (not a test): images/second of feature extraction on the CPU, to choose an encoder and batch size.

Times JPEG decode + preprocess alone, forward alone (batched, under inference_mode), and both in sequence,
on the first N JPEGs of a folder, and prints a markdown table row:
| encoder | image size | batch | preprocess img/s | forward img/s | both img/s |

    python scripts/bench/bench_encoder.py --encoder efficientnet_lite0 --n 256 --batch-size 32

With --compare-folding it times the encoder as stage 2 trains it (BatchNorm unfolded) and as captioning
and `prepare` run it (`Encoder.for_inference()`, BatchNorm folded into the convolutions) in one run, the
two taking turns for --rounds rounds, and prints forward images/s for each and the largest difference
between their features. With --compare-chunks 4,16 it times the inference copy running each batch so
many images at a time (encoders.INFERENCE_CHUNK), taking turns:

    python scripts/bench/bench_encoder.py --compare-chunks 4,16 --n 128 --batch-size 16 --threads 1
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from PIL import Image

from captioner import encoders
from captioner.encoders import Encoder, create_encoder


def load(encoder: Encoder, paths: list[Path]) -> torch.Tensor:
    """Decode and preprocess the images into one (N, 3, S, S) batch."""
    tensors = []
    for path in paths:
        with Image.open(path) as image:
            tensors.append(encoder.preprocess(image))
    return torch.stack(tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="../shared/data/flickr8k/images", help="folder of JPEGs")
    parser.add_argument("--n", type=int, default=256, help="how many images (the first N by name)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--image-size", type=int, default=0, help="0: the encoder's native size")
    parser.add_argument("--layer", default="head")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--compare-folding", action="store_true")
    parser.add_argument("--compare-chunks", help="CHUNK,...: the inference copy's images per pass, compared")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:args.n]
    if not paths:
        raise SystemExit(f"no JPEGs in {args.images}")
    batches = [paths[i:i + args.batch_size] for i in range(0, len(paths), args.batch_size)]
    encoder = create_encoder(args.encoder, image_size=args.image_size, layer=args.layer)
    if args.compare_chunks:
        chunks = [int(c) for c in args.compare_chunks.split(",")]
        return compare_chunks(encoder, [load(encoder, batch) for batch in batches], chunks, args.rounds, args.threads)
    if args.compare_folding:
        return compare_folding(encoder, [load(encoder, batch) for batch in batches], args.rounds, args.threads)

    start = time.perf_counter()
    inputs = [load(encoder, batch) for batch in batches]
    preprocess_s = time.perf_counter() - start

    with torch.inference_mode():
        encoder(inputs[0])  # warm-up: first-call allocations and kernel selection are not steady-state speed
        start = time.perf_counter()
        for x in inputs:
            encoder(x)
        forward_s = time.perf_counter() - start

        start = time.perf_counter()
        for batch in batches:
            encoder(load(encoder, batch))
        both_s = time.perf_counter() - start

    n = len(paths)
    print("| encoder | image size | batch | preprocess img/s | forward img/s | both img/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {encoder.name} | {encoder.image_size} | {args.batch_size} "
          f"| {n / preprocess_s:.1f} | {n / forward_s:.1f} | {n / both_s:.1f} |")


def compare_folding(encoder: Encoder, inputs: list[torch.Tensor], rounds: int, threads: int) -> None:
    folded = encoder.for_inference()
    n = sum(len(x) for x in inputs)
    speeds: dict[str, list[float]] = {"unfolded (stage 2)": [], "folded (captioning, prepare)": []}
    with torch.inference_mode():
        diff = max(float((encoder(x) - folded(x)).abs().max()) for x in inputs)  # also the warm-up
        for _ in range(rounds):
            for name, model in zip(speeds, (encoder, folded)):
                start = time.perf_counter()
                for x in inputs:
                    model(x)
                speeds[name].append(n / (time.perf_counter() - start))
    base = sorted(speeds["unfolded (stage 2)"])[rounds // 2]
    print(f"| threads | encoder | forward img/s (median of {rounds}) | vs unfolded |\n| ---: | --- | ---: | ---: |")
    for name, values in speeds.items():
        median = sorted(values)[rounds // 2]
        print(f"| {threads} | {encoder.name} {name} | {median:.1f} | {median / base:.2f}x |")
    print(f"largest feature difference: {diff:.2e}")


def compare_chunks(encoder: Encoder, inputs: list[torch.Tensor], chunks: list[int], rounds: int, threads: int) -> None:
    folded = encoder.for_inference()
    n = sum(len(x) for x in inputs)
    speeds: dict[int, list[float]] = {chunk: [] for chunk in chunks}
    with torch.inference_mode():
        folded(inputs[0])  # warm-up
        for _ in range(rounds):
            for chunk in chunks:
                encoders.INFERENCE_CHUNK = chunk
                start = time.perf_counter()
                for x in inputs:
                    folded(x)
                speeds[chunk].append(n / (time.perf_counter() - start))
    base = sorted(speeds[chunks[-1]])[rounds // 2]
    print(f"| threads | images per pass | forward img/s (median of {rounds}) | vs {chunks[-1]} |\n"
          "| ---: | ---: | ---: | ---: |")
    for chunk, values in speeds.items():
        median = sorted(values)[rounds // 2]
        print(f"| {threads} | {chunk} | {median:.1f} | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
