"""Probe a self-critical training recipe in minutes: a few hundred steps from a model, with greedy
dev CIDEr (and the captions' length and variety) every --every steps instead of once an epoch.

An SCST recipe can rise and then collapse within one epoch (Flickr8k at lr 5e-5: dev CIDEr up 5
points after 100 steps, below the start after 300), which the epoch-level validation of `captioner
train` does not show. Steps and batches are those of `captioner train --objective scst`; dev is the
first --val-images images of the dev split. Not a benchmark: a tuning aid, its figures are noisy.
Usage: python scripts/probes/probe_scst.py --config configs/flickr8k-scst.yaml --init-from MODEL [--steps 300]
       [--every 50] [--lr 5e-5] [--scst-baseline greedy] [--scst-repeat-penalty 0.5] [--scst-xe-weight 0.5]
       [--val-images 500]
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from captioner.batching import CaptionSet
from captioner.config import Config
from captioner.decoding_options import DecodingOptions
from captioner.evaluate import decode_split
from captioner.features import open_prepared
from captioner.metrics import score_captions
from captioner.models import decoder_from_config
from captioner.objectives import Batch, make_objective
from captioner.runtime import make_optimizer
from captioner.step import train_step
from captioner.train import init_decoder_from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--init-from", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    for name in ("lr", "scst_repeat_penalty", "scst_bleu_weight", "scst_xe_weight"):
        parser.add_argument("--" + name.replace("_", "-"), type=float)
    for name in ("scst_baseline",):
        parser.add_argument("--" + name.replace("_", "-"))
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if k.startswith(("lr", "scst_")) and v is not None}
    cfg = dataclasses.replace(Config.load(args.config), objective="scst", val_images=args.val_images, amp=False,
                              **overrides)
    torch.manual_seed(args.seed)
    prepared = open_prepared(cfg.prepared)
    decoder = decoder_from_config(cfg, len(prepared.vocab), prepared.spec["channels"], prepared.vocab.itos)
    init_decoder_from(decoder, args.init_from, prepared)
    data, objective = CaptionSet(prepared, "train"), make_objective(cfg, prepared)
    optimizer, device = make_optimizer(cfg.optimizer, decoder.parameters(), cfg.lr), torch.device("cpu")
    batches = [b for epoch in range(args.steps // 300 + 2) for b in data.batches(cfg.batch_size, epoch)][: args.steps]
    logs: list[dict[str, float]] = []

    def report(step: int) -> None:
        rows = prepared.indices("val")[: args.val_images]
        predictions = decode_split(decoder, prepared, rows, DecodingOptions(beam_size=1, max_length=cfg.max_length),
                                   device)
        scores = score_captions(predictions, prepared.references(rows), metrics=("Bleu_4", "CIDEr"))
        captions = list(predictions.values())
        recent = {k: np.mean([log[k] for log in logs[-args.every:]]) if logs and k in logs[-1] else np.nan
                  for k in ("reward", "greedy_reward", "xe")}
        print(f"step {step}: dev greedy CIDEr {100 * scores['CIDEr']:.1f} BLEU-4 {100 * scores['Bleu_4']:.1f}, "
              f"{np.mean([len(c.split()) for c in captions]):.1f} words, {len(set(captions))} distinct; "
              f"train reward of samples {recent['reward']:.3f}, of greedy {recent['greedy_reward']:.3f}, "
              f"cross-entropy {recent['xe']:.2f} "
              f"[{time.time() - start:.0f}s] e.g. {captions[1]!r}", flush=True)

    start = time.time()
    report(0)
    for step, images in enumerate(batches, 1):
        rows, owner, captions, lengths = data.batch(images)
        result = train_step(decoder, objective, optimizer, Batch(data.features(rows), rows, owner, captions, lengths),
                            cfg.grad_clip)
        logs.append({k: float(v) / result["n"] for k, v in result.items() if k != "n"})
        if step % args.every == 0:
            report(step)


if __name__ == "__main__":
    main()
