"""Benchmark (not a test): training throughput of the attention decoder, in captions per second.

Runs the real training step (`captioner.train.train_step`: forward, loss with the attention penalty,
backward, clipping, Adam) on a prepared folder's train split, skipping 5 warm-up batches, and prints
one markdown table row. `--compare-precision` instead trains the same seeded model twice from scratch,
float32 and bfloat16 autocast, printing the mean loss every 30 batches of each and the matrix-product
speed of both precisions, which is how the bfloat16 default was checked.

    python scripts/bench_train.py --prepared prepared/flickr8k --batch-size 80 --batches 40
    python scripts/bench_train.py --prepared prepared/flickr8k --batches 40 --no-amp
    python scripts/bench_train.py --prepared prepared/flickr8k --batches 150 --compare-precision
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from captioner.config import Config
from captioner.models import decoder_from_config
from captioner.objectives import Batch, CrossEntropy
from captioner.features import open_prepared
from captioner.runtime import bf16_supported
from captioner.train import CaptionSet, train_step


def run(data: CaptionSet, cfg: Config, batches: list[list[int]], amp: bool, every: int = 0) -> float:
    """Train a fresh seeded decoder over the batches; return captions/s after 5 warm-up batches."""
    torch.manual_seed(0)
    decoder = decoder_from_config(cfg, len(data.prepared.vocab), data.prepared.spec["channels"]).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    start, captions, running = time.perf_counter(), 0, 0.0
    for i, idx in enumerate(batches):
        if i == 5:
            start, captions = time.perf_counter(), 0
        rows, owner, tokens, lengths = data.batch(idx)
        logs = train_step(decoder, CrossEntropy(), optimizer, Batch(data.features(rows), rows, owner, tokens, lengths),
                          cfg.grad_clip, use_amp=amp)
        captions += len(lengths)
        running += float(logs["loss"]) / logs["n"]
        if every and (i + 1) % every == 0:
            print(f"{'bf16' if amp else 'fp32'} batch {i + 1}: mean loss {running / every:.4f}")
            running = 0.0
    return captions / (time.perf_counter() - start)


def matmul_gflops(dtype: torch.dtype, n: int = 80, k: int = 1024, m: int = 2048, reps: int = 50) -> float:
    a, b = torch.randn(n, k, dtype=dtype), torch.randn(k, m, dtype=dtype)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return reps * 2 * n * k * m / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default="prepared/flickr8k")
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--batches", type=int, default=40, help="timed batches, after 5 warm-up ones")
    parser.add_argument("--width", type=int, default=512, help="attention, embedding, LSTM and context width")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compare-precision", action="store_true")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    w = args.width
    cfg = Config(embed_dim=w, attention_dim=w, hidden_dim=w, context_dim=w)
    data = CaptionSet(open_prepared(args.prepared), "train")
    batches = data.batches(args.batch_size, seed=0)[: args.batches + 5]
    if args.compare_precision:
        for amp in (False, True):
            run(data, cfg, batches, amp, every=30)
        print(f"80x1024x2048 product: float32 {matmul_gflops(torch.float32):.0f} GFLOP/s, "
              f"bfloat16 {matmul_gflops(torch.bfloat16):.0f} GFLOP/s")
        return
    amp = args.amp and bf16_supported(torch.device("cpu"))
    speed = run(data, cfg, batches, amp)
    print("| decoder width | batch | precision | threads | captions/s | machine |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {w} | {args.batch_size} | {'bf16 autocast' if amp else 'float32'} | {args.threads} | "
          f"{speed:.0f} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores |")


if __name__ == "__main__":
    main()
