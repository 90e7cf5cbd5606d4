"""Held-out concepts on Flickr8k (Hendricks et al., 2016): per concept, F1 of mentioning it, and CIDEr and
METEOR on the test images whose references mention it; then all-test scores. Each decoding is scored
with concepts and without them (the model alone: F1 0 by construction when it never saw the words).

    captioner prepare --config scripts/probes/flickr8k-heldout.yaml
    captioner train --config scripts/probes/flickr8k-heldout.yaml
    python scripts/probes/heldout_concepts.py --model runs/flickr8k-heldout/best --prepared prepared/flickr8k-heldout

An image counts as a positive of a concept when any of its references mentions one of the concept's
words (the words scripts/probes/flickr8k-heldout.yaml held out, with plurals); a caption mentions it when it
holds one of them. Select on dev (--split val); score test once per finished model.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from captioner.concepts import STRENGTH, Concepts, concept_table
from captioner.decoding_options import DecodingOptions
from captioner.evaluate import decode_split
from captioner.features import open_prepared
from captioner.metrics import score_captions
from captioner.models import load_model
from captioner.vocab import tokenize

CONCEPTS = {
    "bike": "bike bikes bicycle bicycles biker bikers cyclist cyclists",
    "camera": "camera cameras",
    "car": "car cars",
    "boat": "boat boats canoe canoes kayak kayaks sailboat sailboats",
    "bench": "bench benches",
    "motorcycle": "motorcycle motorcycles motorbike motorbikes motorcyclist motorcyclists",
    "horse": "horse horses pony ponies",
    "guitar": "guitar guitars guitarist guitarists",
}


def mentions(text: str, words: set[str]) -> bool:
    return bool(words & set(tokenize(text)))


def hallucinated(caption: str, references: list[str], objects: set[str]) -> bool:
    """CHAIR_s (Rohrbach et al., 2018) over the concept words: the caption names an object (a concept
    word, singular or plural) that none of the image's references names."""
    def named(text: str) -> set[str]:
        return {w[:-1] if w.endswith("s") and w[:-1] in objects else w for w in tokenize(text)} & objects

    return bool(named(caption) - set().union(*map(named, references)))


def f1(predicted: list[bool], actual: list[bool]) -> tuple[float, float, float]:
    hits = sum(p and a for p, a in zip(predicted, actual))
    precision = hits / max(1, sum(predicted))
    recall = hits / max(1, sum(actual))
    return precision, recall, 2 * precision * recall / max(1e-9, precision + recall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--beam-size", type=int, help="default: the model's own")
    parser.add_argument("--concept-threshold", type=float, help="default: the model's own")
    parser.add_argument("--strength", type=float, default=STRENGTH, help=f"concept bonus (default: {STRENGTH})")
    parser.add_argument("--output", type=Path, help="JSON file for every figure and caption")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    prepared = open_prepared(args.prepared)
    loaded = load_model(args.model)
    concepts = Concepts(*loaded.imagenet_head(), loaded.vocab, strength=args.strength)
    rows = prepared.indices(args.split)
    refs = prepared.references(rows)
    base = DecodingOptions(**loaded.decoding)
    changes = {k: v for k, v in {"beam_size": args.beam_size, "concept_threshold": args.concept_threshold}.items()
               if v is not None}
    base = dataclasses.replace(base, **changes)
    # the head alone, as a tagger: a concept is predicted where its probability reaches the threshold
    features = torch.from_numpy(prepared.features[rows].astype(np.float32))
    probs, words = concepts.probs(features), concept_table().vocabulary
    head_alone = {}
    for name, text in CONCEPTS.items():
        actual = [mentions(" ".join(refs[n]), set(text.split())) for n in refs]
        predicted = ([bool(p >= base.concept_threshold) for p in probs[:, words.index(name)].tolist()]
                     if name in words else [False] * len(rows))  # ImageNet-1k may have no class for it
        head_alone[name] = f1(predicted, actual)[2]
    report: dict = {"model": args.model, "head_alone_F1": head_alone, "split": args.split, "decoding": vars(base),
                    "strength": args.strength,
                    "runs": {}}
    for label, on in (("without concepts", False), ("with concepts", True)):
        opts = dataclasses.replace(base, concepts=on)
        predictions = decode_split(loaded.decoder, prepared, rows, opts, torch.device("cpu"), concepts=concepts,
                                   vocab=loaded.vocab)
        run = {"all": score_captions(predictions, refs), "concepts": {}, "captions": predictions}
        objects = set(concept_table().vocabulary)
        run["all"]["CHAIR_s"] = float(np.mean([hallucinated(predictions[n], refs[n], objects) for n in refs]))
        for name, text in CONCEPTS.items():
            words = set(text.split())
            actual = [any(mentions(r, words) for r in refs[n]) for n in refs]
            predicted = [mentions(predictions[n], words) for n in refs]
            positives = [n for n, a in zip(refs, actual) if a]
            scores = score_captions({n: predictions[n] for n in positives}, {n: refs[n] for n in positives})
            precision, recall, f = f1(predicted, actual)
            run["concepts"][name] = {"images": len(positives), "precision": precision, "recall": recall, "F1": f,
                                     "CIDEr": scores["CIDEr"], "METEOR": scores["METEOR"]}
        report["runs"][label] = run
        print(f"\n{label} ({args.split}, {len(rows)} images; all: BLEU-4 {100 * run['all']['Bleu_4']:.1f} "
              f"METEOR {100 * run['all']['METEOR']:.1f} CIDEr {100 * run['all']['CIDEr']:.1f}; captions naming an "
              f"object no reference names {100 * run['all']['CHAIR_s']:.1f}%)")
        print("| concept | images | F1 | precision | recall | CIDEr | METEOR | head alone F1 |\n"
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name, c in run["concepts"].items():
            print(f"| {name} | {c['images']} | {100 * c['F1']:.1f} | {100 * c['precision']:.1f} | "
                  f"{100 * c['recall']:.1f} | {100 * c['CIDEr']:.1f} | {100 * c['METEOR']:.1f} | "
                  f"{100 * head_alone[name]:.1f} |")
        mean = sum(c["F1"] for c in run["concepts"].values()) / len(CONCEPTS)
        print(f"mean F1 {100 * mean:.1f}")
    if args.output:
        args.output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
