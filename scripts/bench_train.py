"""Benchmark (not a test): training throughput of the attention decoder, in captions per second.

Runs the real training step (forward, loss with the attention penalty, backward, clipping, Adam) on a
prepared folder's train split, skipping warm-up batches, and prints one markdown table row.

    python scripts/bench_train.py --prepared prepared/flickr8k --batch-size 80 --batches 40
    python scripts/bench_train.py --prepared prepared/flickr8k --no-amp      # float32 only
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F

from captioner.config import Config
from captioner.decoders import attention_penalty, build_decoder
from captioner.features import open_prepared
from captioner.train import CaptionSet, bf16_supported


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default="prepared/flickr8k")
    parser.add_argument("--batch-size", type=int, default=80)
    parser.add_argument("--batches", type=int, default=40, help="timed batches, after 5 warm-up ones")
    parser.add_argument("--width", type=int, default=512, help="attention, embedding, LSTM and context width")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    w = args.width
    cfg = Config(embed_dim=w, attention_dim=w, hidden_dim=w, context_dim=w)
    prepared = open_prepared(args.prepared)
    data = CaptionSet(prepared, "train")
    decoder = build_decoder(cfg, len(prepared.vocab), prepared.spec["channels"]).train()
    optimizer = torch.optim.Adam(decoder.parameters(), lr=4e-4)
    device = torch.device("cpu")
    amp = args.amp and bf16_supported(device)
    batches = data.batches(args.batch_size, seed=0)[: args.batches + 5]
    captions = 0
    for i, idx in enumerate(batches):
        if i == 5:
            start, captions = time.perf_counter(), 0
        rows, owner, tokens, lengths = data.batch(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits, targets, alphas = decoder(data.features(rows), tokens, lengths, image_index=owner)
            loss = F.cross_entropy(logits.float(), targets) + attention_penalty(alphas.float(), cfg.alpha_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(decoder.parameters(), cfg.grad_clip)
        optimizer.step()
        captions += len(lengths)
    seconds = time.perf_counter() - start
    print("| decoder width | batch | precision | threads | captions/s | machine |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {w} | {args.batch_size} | {'bf16 autocast' if amp else 'float32'} | {args.threads} | "
          f"{captions / seconds:.0f} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores |")


if __name__ == "__main__":
    main()
