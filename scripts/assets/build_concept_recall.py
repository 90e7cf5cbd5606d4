"""Build captioner/concept_recall.tsv: for each concept word, how many Flickr8k train photos have a caption
naming it, and in how many of those the encoder's ImageNet head gives it at least concepts.UNSEEN.

The concept check (decoding.chosen) takes a caption's word as contradicted by the head only where the head
reliably sees that thing when people name it: a dog (95% of the photos whose captions name one), a bike
(63%), but not a shirt (1%), a bench (20%) or a table (0%), which it misses whether or not they are there.
The counts come from the Flickr8k train split's captions and the EfficientNet-Lite0 head of the shipped
model's encoder, over the features `captioner prepare` cached; no caption text is stored.

    captioner prepare --config configs/flickr8k.yaml                # the cached Lite0 features
    python scripts/assets/build_concept_recall.py --prepared prepared/flickr8k
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from captioner.concepts import RECALL_FILE, RECALL_HEADER, UNSEEN, concept_columns, concept_table, named
from captioner.features import open_prepared
from captioner.pipeline import DEFAULT_MODEL, Captioner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, required=True, help="a prepared Flickr8k folder (Lite0 features)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the model whose encoder head is counted")
    parser.add_argument("--output", type=Path, default=RECALL_FILE)
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model, device="cpu")
    assert captioner.concepts is not None, f"{args.model}'s encoder has no ImageNet head"
    prepared = open_prepared(args.prepared)
    rows = prepared.indices("train")
    words, column = concept_table().vocabulary, concept_columns()
    photos, seen = np.zeros(len(words), dtype=np.int64), np.zeros(len(words), dtype=np.int64)
    for start in range(0, len(rows), 500):
        chunk = rows[start:start + 500]
        with torch.inference_mode():
            probs = captioner.concepts.probs(torch.from_numpy(prepared.features[chunk].astype(np.float32))).numpy()
        for row, p in zip(chunk, probs):
            for word in set().union(*(named(c) for c in prepared.records[row].captions)):
                photos[column[word]] += 1
                seen[column[word]] += p[column[word]] >= UNSEEN
    lines = [RECALL_HEADER] + [f"{w}\t{photos[j]}\t{seen[j]}" for j, w in enumerate(words) if photos[j]]
    args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{args.output}: {len(lines) - 1} words named in {len(rows)} train photos' captions")


if __name__ == "__main__":
    main()
