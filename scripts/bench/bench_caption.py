"""Benchmark (not a test): captioning speed of the shipped model from JPEG files.

Cold start: wall time of a fresh `captioner caption ONE.jpg` process until the caption is printed.
Throughput: images per second of `Captioner` on a folder (the first N JPEGs), batched, beam 5,
with the encoder and decoder shares of the time.

    python scripts/bench/bench_caption.py --images ../shared/data/flickr8k/images --n 100 --beam-size 5
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioner.data import load_image
from captioner.decoding import beam_search
from captioner.decoding_options import DecodingOptions
from captioner.pipeline import Captioner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default="../shared/data/flickr8k/images")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--beam-size", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--cold-runs", type=int, default=3)
    args = parser.parse_args()

    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[: args.n]
    cmd = [sys.executable, "-m", "captioner.cli", "caption",
           str(paths[0])] + (["--model", args.model] if args.model else [])
    cold = []
    for _ in range(args.cold_runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        cold.append(time.perf_counter() - start)

    captioner = Captioner.from_pretrained(args.model, device="cpu")
    opts = captioner.options(beam_size=args.beam_size)
    captioner.generate([load_image(paths[0])], opts)  # warm-up
    load_s = encode_s = decode_s = 0.0
    for s in range(0, len(paths), args.batch_size):
        t0 = time.perf_counter()
        images = [load_image(p) for p in paths[s:s + args.batch_size]]
        batch = torch.stack([captioner.encoder.preprocess(im) for im in images])
        t1 = time.perf_counter()
        with torch.inference_mode():
            features = captioner.encoder.regions(batch)
            t2 = time.perf_counter()
            beam_search(captioner.decoder, features, DecodingOptions(beam_size=args.beam_size,
                        max_length=opts.max_length))
        t3 = time.perf_counter()
        load_s, encode_s, decode_s = load_s + t1 - t0, encode_s + t2 - t1, decode_s + t3 - t2
    total = load_s + encode_s + decode_s
    n = len(paths)
    print(f"cold start (process start to caption printed, {args.cold_runs} runs): "
          f"min {min(cold):.2f} s, median {sorted(cold)[len(cold) // 2]:.2f} s")
    print("| images | beam | batch | images/s | load+preprocess ms/img | encoder ms/img | decoder ms/img | threads |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| {n} | {args.beam_size} | {args.batch_size} | {n / total:.1f} | {1000 * load_s / n:.1f} | "
          f"{1000 * encode_s / n:.1f} | {1000 * decode_s / n:.1f} | {torch.get_num_threads()} |")


if __name__ == "__main__":
    main()
