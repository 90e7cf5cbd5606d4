"""Pseudo-captions for the held-out protocol's withheld images (PS-NOC's lever, Bujimalla et al., 2021):
the held-out model captions the train images whose human captions were withheld, writing what the
encoder's ImageNet head recognises in the place of its nearest known words (concepts.py, with a
stronger bonus than captioning's default), and every caption that so gained a word the model never learned becomes a
training caption.

    python scripts/probes/heldout_pseudo_captions.py --model runs/flickr8k-heldout/best \
        --full prepared/flickr8k --heldout prepared/flickr8k-heldout --output prepared/heldout-pseudo.jsonl \
        --strength 16
    captioner prepare --config scripts/probes/flickr8k-heldout-pseudo.yaml
    captioner train --config scripts/probes/flickr8k-heldout-pseudo.yaml --no-amp

The withheld images are used as unpaired images, as DCC and NOC use labelled images of the held-out
classes: their human captions are never read, only the head's probabilities and the held-out model's
own words. The output (JSONL, captioner's custom format) holds every record of the held-out folder with
its human captions and split, then one pseudo-captioned train record per withheld image whose caption
holds a new word.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path

import torch

from captioner.concepts import Concepts
from captioner.decoding_options import DecodingOptions
from captioner.evaluate import decode_split
from captioner.features import open_prepared
from captioner.models import load_model
from captioner.vocab import tokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the held-out model")
    parser.add_argument("--full", required=True, help="prepared folder of the whole dataset (same encoder)")
    parser.add_argument("--heldout", required=True, help="the held-out prepared folder the model was trained on")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--concept-threshold", type=float, default=0.2)
    parser.add_argument("--strength", type=float, default=16.0,
                        help="concept bonus; 8 writes fewer new words, in places that read better (docs/RESULTS.md)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    full, heldout, loaded = open_prepared(args.full), open_prepared(args.heldout), load_model(args.model)
    if full.spec != heldout.spec:
        raise SystemExit(f"{args.full} and {args.heldout} hold features of different encoders")
    kept = {r.name for r in heldout.records}
    withheld = [i for i in full.indices("train") if full.records[i].name not in kept]
    concepts = Concepts(*loaded.imagenet_head(), loaded.vocab, strength=args.strength)
    opts = dataclasses.replace(DecodingOptions(**loaded.decoding), concepts=True,
                               concept_threshold=args.concept_threshold)
    captions = decode_split(loaded.decoder, full, withheld, opts, torch.device("cpu"), concepts=concepts,
                            vocab=loaded.vocab)
    new_words: Counter[str] = Counter()
    lines = [{"image": str(r.image), "captions": list(r.captions), "split": r.split} for r in heldout.records]
    for i in withheld:
        record = full.records[i]
        new = {w for w in tokenize(captions[record.name]) if w not in loaded.vocab.stoi}
        if new:
            new_words.update(new)
            lines.append({"image": str(record.image), "captions": [captions[record.name]], "split": "train"})
    args.output.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    print(f"{len(withheld)} withheld train images; {len(lines) - len(heldout.records)} pseudo-captioned "
          f"with a new word; new words: {', '.join(f'{w} {n}' for w, n in new_words.most_common())}")


if __name__ == "__main__":
    main()
