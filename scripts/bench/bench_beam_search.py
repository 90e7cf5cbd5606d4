"""Benchmark (not a test): this checkout's beam search against the one of another commit, on a trained model
and real photos, with the model's own decoding (retrieval, concepts, beam size, length penalty).

The photos are encoded (and their captions retrieved) once; then the two versions of `captioner/decoding.py`
take turns searching every batch, and the captions of both must come out the same. Beam search on the
CPU depends on the decoder's step, so timing it on random weights (bench_decoding.py) misses what real
captions do: most images finish before max_length.

    OMP_NUM_THREADS=1 python scripts/bench/bench_beam_search.py --against HEAD~1 \
        --model captioner/models/flickr8k-lite0 --photos ../shared/data/coco-dev/images
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from captioner import Captioner, decoding
from captioner.data import expand_inputs, load_image
from captioner.models.base import Decoder
from captioner.runtime import cpu_name


def decoding_at(commit: str, folder: Path) -> ModuleType:
    """captioner/decoding.py as it was at `commit`, imported beside today's (its relative imports are today's)."""
    source = subprocess.run(["git", "show", f"{commit}:captioner/decoding.py"], check=True, capture_output=True,
                            text=True).stdout
    path = folder / "decoding_then.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("captioner.decoding_then", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the commit whose beam search to time beside this one's")
    parser.add_argument("--model", default="captioner/models/flickr8k-lite0")
    parser.add_argument("--photos", required=True)
    parser.add_argument("--limit", type=int, default=96, help="photos used")
    parser.add_argument("--batch-size", type=int, default=8, help="photos per search (caption's default)")
    parser.add_argument("--turns", type=int, default=5)
    args = parser.parse_args()

    captioner = Captioner.from_pretrained(args.model, device="cpu")
    opts = captioner.options()
    paths = expand_inputs([args.photos])[: args.limit]
    batches: list[tuple[Decoder, torch.Tensor]] = []
    with torch.inference_mode():
        for start in range(0, len(paths), args.batch_size):
            images = [captioner.encoder.preprocess(load_image(p)) for p in paths[start:start + args.batch_size]]
            features = captioner.encoder.regions(torch.stack(images))
            batches.append((captioner.search_decoder(features, opts)[0], features))
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        versions = {args.against: decoding_at(args.against, Path(folder)), "this checkout": decoding}
        times: dict[str, list[float]] = {name: [] for name in versions}
        for _ in range(args.turns):
            found = {}
            for name, module in versions.items():
                start = time.perf_counter()
                found[name] = [[c.tokens for c in captions] for decoder, features in batches
                               for captions in module.beam_search(decoder, features, opts)]
                times[name].append(time.perf_counter() - start)
            if found[args.against] != found["this checkout"]:
                raise SystemExit("the two beam searches wrote different captions")
    then, now = times[args.against], times["this checkout"]
    ratios = [b / a for a, b in zip(then, now)]
    print(f"{cpu_name()}, {torch.get_num_threads()} thread(s), float32, {len(paths)} photos in batches of "
          f"{args.batch_size}, beam {opts.beam_size}, {args.model}; the same captions from both")
    print("| beam search | seconds, each turn | median | vs the other |\n| --- | --- | ---: | ---: |")
    print(f"| {args.against} | {', '.join(f'{t:.2f}' for t in then)} | {statistics.median(then):.2f} | 1.00x |")
    print(f"| this checkout | {', '.join(f'{t:.2f}' for t in now)} | {statistics.median(now):.2f} | "
          f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
