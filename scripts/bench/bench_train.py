"""Benchmark (not a test): training throughput of the attention decoder, in captions per second.

Runs the real training step (`captioner.step.train_step`: forward, loss with the attention penalty,
backward, clipping, Adam) on a prepared folder's train split, skipping 5 warm-up batches, and prints
one markdown table row. `--compare-precision` instead trains the same seeded model twice from scratch,
float32 and bfloat16 autocast, printing the mean loss every 30 batches of each and the matrix-product
speed of both precisions, which is how the bfloat16 default was checked.

    python scripts/bench/bench_train.py --prepared prepared/flickr8k --batch-size 80 --batches 40
    python scripts/bench/bench_train.py --prepared prepared/flickr8k --batches 40 --no-amp
    python scripts/bench/bench_train.py --prepared prepared/flickr8k --batches 150 --compare-precision
    python scripts/bench/bench_train.py --prepared prepared/flickr8k --no-amp --tutorial PATH/TO/models.py
    python scripts/bench/bench_train.py --prepared prepared/flickr8k --no-amp --batches 10 --profile
    python scripts/bench/bench_train.py --prepared prepared/flickr8k --no-amp \
        --decoders attention,attention:4,hard-attention

`--decoders` times several LSTM families (`:H` for H attention heads) on the same batches, taking turns.

`--tutorial` times the decoder of the sgrvinod "PyTorch Tutorial to Image Captioning" beside this
project's, on the same batches and features (its `DecoderWithAttention` over our 7x7x1280 maps as its
encoder output, 512 wide, its training step: packed cross-entropy plus the doubly stochastic penalty,
clipping at 5, Adam), the two taking turns for --rounds rounds. Give the path of `models.py` in your
own checkout of that repository: none of its code is in this one.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

import torch

from captioner.batching import CaptionSet
from captioner.config import Config
from captioner.features import open_prepared
from captioner.models import decoder_from_config
from captioner.objectives import Batch, CrossEntropy
from captioner.runtime import bf16_supported, cpu_name
from captioner.step import train_step


def run(data: CaptionSet, cfg: Config, batches: list[list[int]], amp: bool, every: int = 0,
        profiler: torch.profiler.profile | None = None) -> float:
    """Train a fresh seeded decoder over the batches; return captions/s after 5 warm-up batches, which
    `profiler` (started there) records."""
    torch.manual_seed(0)
    decoder = decoder_from_config(cfg, len(data.prepared.vocab), data.prepared.spec["channels"]).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    start, captions, running = time.perf_counter(), 0, 0.0
    for i, idx in enumerate(batches):
        if i == 5:
            start, captions = time.perf_counter(), 0
            if profiler is not None:
                profiler.start()
        rows, owner, tokens, lengths = data.batch(idx)
        logs = train_step(decoder, CrossEntropy(), optimizer, Batch(data.features(rows), rows, owner, tokens, lengths),
                          cfg.grad_clip, use_amp=amp)
        captions += len(lengths)
        running += float(logs["loss"]) / logs["n"]
        if every and (i + 1) % every == 0:
            print(f"{'bf16' if amp else 'fp32'} batch {i + 1}: mean loss {running / every:.4f}")
            running = 0.0
    if profiler is not None:
        profiler.stop()
    return captions / (time.perf_counter() - start)


def tutorial_speed(models_py: Path, data: CaptionSet, cfg: Config, batches: list[list[int]]) -> float:
    """captions/s of the tutorial's decoder trained on the same batches (float32: it has no autocast)."""
    if "torchvision" not in sys.modules:  # its models.py imports torchvision for its encoder, unused here
        try:
            import torchvision  # noqa: F401
        except ImportError:
            sys.modules["torchvision"] = types.ModuleType("torchvision")
    spec = importlib.util.spec_from_file_location("tutorial_models", models_py)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    channels = data.prepared.spec["channels"]
    decoder = module.DecoderWithAttention(attention_dim=cfg.attention_dim, embed_dim=cfg.embed_dim,
                                          decoder_dim=cfg.hidden_dim, vocab_size=len(data.prepared.vocab),
                                          encoder_dim=channels, dropout=0.5).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=cfg.lr)
    pack = torch.nn.utils.rnn.pack_padded_sequence
    start, captions = time.perf_counter(), 0
    for i, idx in enumerate(batches):
        if i == 5:
            start, captions = time.perf_counter(), 0
        rows, owner, tokens, lengths = data.batch(idx)
        features = data.features(rows)[owner]  # one feature map per caption, as the tutorial feeds them
        grid = int(features.shape[1] ** 0.5)
        scores, caps, decode_lengths, alphas, _ = decoder(features.view(len(owner), grid, grid, channels),
                                                           tokens.long(), lengths.view(-1, 1))
        loss = (torch.nn.functional.cross_entropy(pack(scores, decode_lengths, batch_first=True).data,
                                                  pack(caps[:, 1:], decode_lengths, batch_first=True).data)
                + cfg.alpha_c * ((1.0 - alphas.sum(dim=1)) ** 2).mean())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_value_(decoder.parameters(), cfg.grad_clip)  # the tutorial clips values
        optimizer.step()
        captions += len(lengths)
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
    parser.add_argument("--tutorial", type=Path, help="the tutorial's models.py, to time its decoder beside ours")
    parser.add_argument("--decoders", help="FAMILY[:HEADS],...: time these decoders, taking turns")
    parser.add_argument("--rounds", type=int, default=2, help="--tutorial, --decoders: turns each")
    parser.add_argument("--profile", action="store_true", help="the attention LSTM's step under torch.profiler: "
                                                               "its operators by time over the timed batches")
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
    if args.profile:
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        run(data, cfg, batches, amp, profiler=profiler)
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
        return
    if args.tutorial:
        ours, theirs = [], []
        for _ in range(args.rounds):
            ours.append(run(data, cfg, batches, amp))
            theirs.append(tutorial_speed(args.tutorial, data, cfg, batches))
        print(f"{cpu_name()}, {args.threads} threads, batch {args.batch_size}, "
              f"{w} wide; ours in {'bf16 autocast' if amp else 'float32'}, the tutorial's in float32")
        print("| decoder | captions/s (each turn) | vs the tutorial's |\n| --- | --- | ---: |")
        print(f"| the tutorial's DecoderWithAttention | {', '.join(f'{x:.0f}' for x in theirs)} | 1.00x |")
        print(f"| captioner's attention LSTM | {', '.join(f'{x:.0f}' for x in ours)} | "
              f"{sum(ours) / sum(theirs):.2f}x |")
        return
    if args.decoders:
        specs = args.decoders.split(",")
        speeds: dict[str, list[float]] = {spec: [] for spec in specs}
        for _ in range(args.rounds):
            for spec in specs:
                family, _, heads = spec.partition(":")
                shape = dataclasses.replace(cfg, decoder=family, attention_heads=int(heads or 1))
                speeds[spec].append(run(data, shape, batches, amp))
        print(f"{cpu_name()}, {args.threads} threads, batch {args.batch_size}, {w} wide, "
              f"{'bf16 autocast' if amp else 'float32'}")
        print("| decoder | captions/s (each turn) | vs the first |\n| --- | --- | ---: |")
        for spec, values in speeds.items():
            print(f"| {spec} | {', '.join(f'{x:.0f}' for x in values)} | "
                  f"{sum(values) / sum(speeds[specs[0]]):.2f}x |")
        return
    speed = run(data, cfg, batches, amp)
    print("| decoder width | batch | precision | threads | captions/s | machine |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {w} | {args.batch_size} | {'bf16 autocast' if amp else 'float32'} | {args.threads} | "
          f"{speed:.0f} | {cpu_name()}, {os.cpu_count()} cores |")


if __name__ == "__main__":
    main()
