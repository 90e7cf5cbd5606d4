"""Fit a model's familiarity check (captioner/familiarity.py) and put it in its folder: which photos look
unlike the photos its decoder learned from, so that the captions of similar photos vote on theirs.

The check tells the training photos (the prepared folder's train split) from a library of other photos. Both
kinds are seen at the training photos' size (`--size`: Flickr8k's are 224 x 224) and again shrunk further
(`--shrink`), so that what it learns is what the photos show, not how sharp they are: Flickr8k's small squares
are blurrier than a library's or a camera's photos, and a check that learned blur would call every sharp photo
unfamiliar. It then prints, per threshold, how many photos of the prepared folder's dev split it would call
unfamiliar (the shipped threshold is the lowest that calls none: docs/RESULTS.md).

    captioner prepare --config configs/flickr8k.yaml                # the cached Lite0 features of Flickr8k
    python scripts/assets/build_familiarity.py --prepared prepared/flickr8k \\
        --library ../shared/data/coco-unlabeled/images --model captioner/models/flickr8k-lite0
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import cast

import torch

from captioner.data import expand_inputs
from captioner.encoders import Encoder
from captioner.familiarity import fit_familiarity, pooled_features
from captioner.features import open_prepared
from captioner.models.files import add_familiarity
from captioner.pipeline import Captioner

L2 = 0.1  # chosen on the dev sets (docs/RESULTS.md, "Photos unlike Flickr8k's")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, required=True, help="the prepared folder the model trained on")
    parser.add_argument("--library", required=True, help="a folder of other photos (an everyday library)")
    parser.add_argument("--model", type=Path, required=True, help="the model folder to put the check in")
    parser.add_argument("--size", type=int, default=224, help="the training photos' size (Flickr8k's: 224)")
    parser.add_argument("--shrink", type=int, default=196, help="the size both kinds are seen at again")
    args = parser.parse_args()
    encoder = cast(Encoder, Captioner.from_pretrained(args.model, device="cpu").encoder)  # the PyTorch backend's
    prepared = open_prepared(args.prepared)
    if prepared.spec != encoder.spec():
        raise SystemExit(f"{args.prepared} holds features of another encoder than {args.model}'s")
    train = prepared.indices("train")
    cached = prepared.pooled(train)
    train_paths = [Path(prepared.records[i].image) for i in train]
    library = expand_inputs([args.library])
    familiar = torch.cat([cached, pooled_features(encoder, train_paths, args.shrink)])
    other = torch.cat([pooled_features(encoder, library, args.size), pooled_features(encoder, library, args.shrink)])
    check = fit_familiarity(familiar, other, L2)
    check.metadata.update({"familiar": f"the train split of {args.prepared}, {len(train)} photos",
                           "unfamiliar": f"{args.library}, {len(library)} photos",
                           "sizes": f"{args.size} and {args.shrink}", "l2": str(L2)})
    add_familiarity(args.model, check)
    dev = prepared.indices("val")
    p = check.unfamiliar(prepared.pooled(dev)[:, None])
    print(f"{args.model}: familiarity check from {len(train)} training and {len(library)} library photos; "
          f"{len(dev)} dev photos, the highest probability {p.max():.3f}")
    for threshold in (0.5, 0.7, 0.8, 0.85, 0.9, 0.95):
        print(f"  unfamiliar past {threshold}: {int((p > threshold).sum())} dev photos")


if __name__ == "__main__":
    main()
