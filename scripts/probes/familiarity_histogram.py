"""Draw how unfamiliar a model's familiarity check finds the photos of two dev sets: Flickr8k dev (the cached
features of a prepared folder) and coco-dev (its photos), with the model's threshold; docs/images/familiarity.png.

    python scripts/probes/familiarity_histogram.py --prepared prepared/flickr8k --set ../shared/data/coco-dev \
        --output docs/images/familiarity.png --photos examples/photos
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

import matplotlib
import numpy as np

from captioner.data import expand_inputs
from captioner.encoders import Encoder
from captioner.familiarity import pooled_features
from captioner.features import open_prepared
from captioner.pipeline import DEFAULT_MODEL, Captioner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, required=True, help="prepared Flickr8k (Lite0 features)")
    parser.add_argument("--set", type=Path, required=True, help="a folder with images/ (coco-dev)")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--photos", nargs="*", default=[], help="also print each of these photos' probability "
                        "(the README's: examples/photos)")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model, device="cpu")
    check = captioner.familiarity
    if check is None:
        raise SystemExit(f"{args.model} has no familiarity check")
    prepared = open_prepared(args.prepared)
    dev = prepared.indices("val")
    flickr = check.unfamiliar(prepared.pooled(dev)[:, None])
    photos = sorted((args.set / "images").glob("*.jpg"))
    coco = check.unfamiliar(pooled_features(cast(Encoder, captioner.encoder), photos)[:, None])
    threshold = captioner.defaults.unfamiliar_threshold
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), dpi=120)
    bins = np.linspace(0, 1, 41)
    for p, label, colour in ((flickr, f"Flickr8k dev ({len(flickr)} photos)", "tab:blue"),
                             (coco, f"coco-dev ({len(coco)} photos)", "tab:orange")):
        ax.hist(p, bins=bins, weights=np.full(len(p), 100 / len(p)), alpha=0.6, label=label, color=colour)
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1)
    ax.text(threshold - 0.01, ax.get_ylim()[1] * 0.9, f"threshold {threshold:g}: past it, the retrieved captions vote",
            ha="right", fontsize=8)
    ax.set_xlabel("the familiarity check: probability that the photo is unlike Flickr8k's training photos")
    ax.set_ylabel("% of the set's photos")
    ax.legend(fontsize=8, loc="center")
    fig.tight_layout()
    fig.savefig(args.output)
    named = expand_inputs(args.photos)
    if named:
        for path, p in zip(named, check.unfamiliar(pooled_features(cast(Encoder, captioner.encoder), named)[:, None])):
            print(f"{path}: {p:.2f}")
    print(f"{args.output}: Flickr8k dev past {threshold:g}: {int((flickr > threshold).sum())}, coco-dev: "
          f"{int((coco > threshold).sum())}")


if __name__ == "__main__":
    main()
