"""What retrieval costs at inference: a retrieval model against the shipped one, measured in one run.

    git archive 6875b3e captioner/models/flickr8k-lite0 | tar -x -C /tmp/attn    # the model before retrieval
    OMP_NUM_THREADS=1 python scripts/bench/bench_retrieval.py --baseline /tmp/attn/captioner/models/flickr8k-lite0 \
        --photos ../shared/data/coco-dev/images

Rows: the datastore search per photo (one query at a time, by image vector alone and with the concept ranking, whose
first pass finds the captions naming each concept word, then knows them; then 8 at a time, as a folder is
captioned), captioning the folder (batches of 8, as `captioner caption`; also with `--consensus`, with
`--no-concept-check` and with `--unfamiliar-threshold 1`), and the cold start (a new process importing captioner,
loading the model and captioning one photo). `--profile` instead lists where each model's time goes. The models take
turns, --repeats turns; each row gives the median time and the median of the turns' ratios to the baseline (with
their range), since the speed of a shared machine drifts between turns. Run nothing else heavy beside it.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from captioner.concepts import concept_table
from captioner.data import expand_inputs, load_image
from captioner.models.retrieval import retrieve
from captioner.pipeline import DEFAULT_MODEL, Captioner

COLD = """
import sys, time
start = time.perf_counter()
from captioner.pipeline import Captioner
c = Captioner.from_pretrained(sys.argv[1], device="cpu")
c(sys.argv[2])
print(time.perf_counter() - start)
"""


# the retrieval model's folder timings: its defaults, then each of these flags alone
SETTINGS: dict[str, dict[str, object]] = {"": {}, ", --consensus": {"consensus": True},
                                          ", --no-concept-check": {"concept_check": False},
                                          ", --unfamiliar-threshold 1": {"unfamiliar_threshold": 1.0}}


def caption_folder(captioner: Captioner, images: list, batch: int = 8, **options: object) -> float:
    start = time.perf_counter()
    opts = captioner.options(**options)
    for s in range(0, len(images), batch):
        captioner.generate(images[s:s + batch], opts)
    return time.perf_counter() - start


def cold_start(model: Path, photo: Path) -> float:
    return float(subprocess.run([sys.executable, "-c", COLD, str(model), str(photo)], capture_output=True,
                                text=True, check=True).stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the retrieval model folder (default: shipped)")
    parser.add_argument("--baseline", required=True, help="the model it is compared with, e.g. the attention "
                                                          "model shipped before it (git archive 6875b3e)")
    parser.add_argument("--photos", required=True)
    parser.add_argument("--repeats", type=int, default=5, help="turns of each timing")
    parser.add_argument("--profile", action="store_true", help="instead: each model's operators by time (with "
                        "their input shapes) over one pass of the folder, under torch.profiler")
    args = parser.parse_args()

    paths = expand_inputs([args.photos])
    images = [load_image(p) for p in paths]
    ours = Captioner.from_pretrained(args.model, device="cpu")
    theirs = Captioner.from_pretrained(args.baseline, device="cpu")
    if args.profile:
        for name, model in (("baseline", theirs), ("retrieval model", ours)):
            with torch.inference_mode():
                caption_folder(model, images[:8])  # warm up
                with torch.profiler.profile(record_shapes=True) as profiler:
                    caption_folder(model, images)
            print(f"{name}:\n" + profiler.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=28, max_shapes_column_width=50))
        return
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), float32; {len(paths)} photos")
    with torch.inference_mode():
        batch = torch.stack([ours.encoder.preprocess(im) for im in images[:64]])
        features = ours.encoder.regions(batch)
        vectors = ours.embedder(features).numpy()
        probs = ours.concepts.probs(features).numpy()
    words, args_ = concept_table().vocabulary, ours.decoder.args
    ranking = ours.defaults.retrieval_concepts
    for name, weight in (("by image vector", 0.0), ("with the concept ranking, first pass (each concept word "
                                                     "looked up once)", ranking),
                         ("with the concept ranking, the same photos again (words known)", ranking)):
        start = time.perf_counter()
        for i in range(len(vectors)):
            retrieve(ours.datastore, vectors[i:i + 1], ours.vocab, args_, concept_probs=probs[i:i + 1],
                     concept_words=words, concept_weight=weight)
        print(f"| datastore search {name} ({len(ours.datastore):,} captions) | "
              f"{1000 * (time.perf_counter() - start) / len(vectors):.1f} ms / photo |")
    start = time.perf_counter()
    for i in range(0, len(vectors), 8):  # as `captioner caption` searches: a batch of photos at a time
        retrieve(ours.datastore, vectors[i:i + 8], ours.vocab, args_, concept_probs=probs[i:i + 8],
                 concept_words=words, concept_weight=ranking)
    print(f"| datastore search with the concept ranking, 8 photos at a time | "
          f"{1000 * (time.perf_counter() - start) / len(vectors):.1f} ms / photo |")
    with torch.inference_mode():
        caption_folder(ours, images[:8]), caption_folder(theirs, images[:8])  # warm up
        # the settings take turns and each turn's ratio is kept: this machine's speed drifts between turns
        folder = [[caption_folder(theirs, images)] + [caption_folder(ours, images, **o) for o in SETTINGS.values()]
                  for _ in range(args.repeats)]
    cold = [(cold_start(Path(args.baseline), paths[0]), cold_start(Path(args.model), paths[0]))
            for _ in range(args.repeats)]
    print(f"| caption {len(paths)} photos, baseline model | {seconds([t[0] for t in folder])} | 1.00x |")
    for i, flags in enumerate(SETTINGS, start=1):
        print(f"| caption {len(paths)} photos, retrieval model{flags} | {seconds([t[i] for t in folder])} | "
              f"{ratios([t[i] / t[0] for t in folder])} |")
    print(f"| cold start, baseline model | {seconds([t[0] for t in cold])} | 1.00x |")
    print(f"| cold start, retrieval model | {seconds([t[1] for t in cold])} | {ratios([t[1] / t[0] for t in cold])} |")


def seconds(times: list[float]) -> str:
    return f"median {statistics.median(times):.2f} s (min {min(times):.2f})"


def ratios(values: list[float]) -> str:
    """The median of the turns' ratios to the baseline, and their range."""
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"

if __name__ == "__main__":
    main()
