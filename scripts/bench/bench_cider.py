"""Time CIDEr-D rewards as self-critical training computes them, against the rest of a training step.

The shipped model samples k captions for each of a batch of train images (prepared features), with
gradients; CiderD (document frequencies from the whole train split) scores them; the policy-gradient
loss is backpropagated. Reports each part's time, CiderD's captions/s, and pycocoevalcap's Cider on
the same captions (k calls, one caption per image each: its document frequencies then come from the
batch's references alone, so only its speed compares). Wall time of the fastest of --repeats runs.
Usage: python scripts/bench/bench_cider.py --prepared prepared/flickr8k [--images 50] [--samples 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from captioner.cider import CiderD
from captioner.decoding import sample
from captioner.features import open_prepared
from captioner.models import load_model
from captioner.vocab import tokenize

MODEL = Path(__file__).resolve().parents[2] / "captioner" / "models" / "flickr8k-lite0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prepared = open_prepared(args.prepared)
    loaded = load_model(args.model)
    decoder, vocab = loaded.decoder.train(), loaded.vocab
    train = prepared.indices("train")
    start = time.perf_counter()
    references = {r: [tokenize(c) for c in prepared.records[r].captions] for r in train}
    tokenized = time.perf_counter()
    scorer = CiderD(references)
    built = time.perf_counter()
    print(f"CiderD over {len(train)} train images: {tokenized - start:.2f} s tokenising, {built - tokenized:.2f} s "
          "building (once per run)")

    rows = train[: args.images]
    features = torch.from_numpy(prepared.features[rows].astype(np.float32))
    image_ids = [r for r in rows for _ in range(args.samples)]
    times: dict[str, list[float]] = {"sample": [], "cider": [], "backward": [], "pycocoevalcap": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens, logprobs, lengths = sample(decoder, features, args.samples, args.max_length)
        t1 = time.perf_counter()
        candidates = [vocab.decode(row).split() for row in tokens.tolist()]
        rewards = scorer.score(image_ids, candidates)
        t2 = time.perf_counter()
        advantage = torch.from_numpy(rewards - rewards.reshape(args.images, args.samples).mean(1).repeat(args.samples))
        loss = -(advantage.float() * logprobs.sum(dim=1)).mean()
        decoder.zero_grad()
        loss.backward()
        t3 = time.perf_counter()
        coco_seconds = coco_cider_seconds(references, rows, candidates, args.samples)
        for name, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, coco_seconds)):
            times[name].append(seconds)
    best = {name: min(v) for name, v in times.items()}
    step = best["sample"] + best["cider"] + best["backward"]
    n = len(image_ids)
    print(f"{args.images} images x {args.samples} samples ({n} captions, mean length "
          f"{np.mean([len(c) for c in candidates]):.1f} words), {args.threads} threads:")
    print(f"  sampling (forward) {1000 * best['sample']:.0f} ms, backward {1000 * best['backward']:.0f} ms")
    print(f"  CiderD rewards {1000 * best['cider']:.1f} ms = {n / best['cider']:,.0f} captions/s, "
          f"{100 * best['cider'] / step:.1f}% of the step")
    print(f"  pycocoevalcap Cider on the same captions: {1000 * best['pycocoevalcap']:.0f} ms = "
          f"{n / best['pycocoevalcap']:,.0f} captions/s ({best['pycocoevalcap'] / best['cider']:.0f}x CiderD's time)")


def coco_cider_seconds(references: dict, rows: list[int], candidates: list[list[str]], k: int) -> float:
    from pycocoevalcap.cider.cider import Cider

    gts = {r: [" ".join(c) for c in references[r]] for r in rows}
    start = time.perf_counter()
    for j in range(k):
        Cider().compute_score(gts, {r: [" ".join(candidates[i * k + j])] for i, r in enumerate(rows)})
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
