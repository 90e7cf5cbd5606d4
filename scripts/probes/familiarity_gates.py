"""Consensus for the photos a familiarity check calls unlike Flickr8k's (captioner/familiarity.py), scored from
dump_candidates.py's files without running the decoder again: how the check was chosen.

Each variant fits a check on Flickr8k's train photos (cached features) against a library's photos, at the
sizes named; each row says, at a threshold, how many coco-dev and Flickr8k dev photos it calls unfamiliar and
the BLEU-4 / CIDEr (x100, CIDEr's idf from the scored photos' references) when those are decided by the vote
(beams and voters alike, or the voters alone), the others by the shipped default (the concept check). The
coco-dev photos are also encoded shrunk to 224 first: a check that learned how sharp a photo is, not what it
shows, calls them unfamiliar at another rate than as given.

    python scripts/probes/dump_candidates.py --set ../shared/data/coco-dev --output /tmp/coco.json
    python scripts/probes/dump_candidates.py --set ../shared/data/flickr8k --split val --output /tmp/f8kdev.json
    python scripts/probes/familiarity_gates.py /tmp/coco.json /tmp/f8kdev.json --prepared prepared/flickr8k \\
        --library ../shared/data/coco-unlabeled/images
"""
from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import cast

import torch
from consensus_gates import Row, checked, concept_probs, score  # the probe beside this one

from captioner.concepts import RECALL_FILE, UNSEEN, named, read_recall
from captioner.consensus import VOTERS, rerank
from captioner.data import expand_inputs
from captioner.encoders import Encoder
from captioner.familiarity import fit_familiarity, pooled_features
from captioner.features import open_prepared
from captioner.pipeline import DEFAULT_MODEL, Captioner

RELIABLE = read_recall(RECALL_FILE, 0.5)  # the shipped concept check's words


def default(row: Row) -> str:
    return checked(row, RELIABLE, 0.3)


def unseen(row: Row, text: str) -> set[str]:
    return {w for w in named(text) & RELIABLE if row["sure"].get(w, 0.0) < UNSEEN}


def gated(row: Row, threshold: float, lean: float) -> str:
    """decoding.chosen for an unfamiliar photo: where the concept check fires, beams naming an unseen thing
    leave the vote."""
    if row["p"] <= threshold:
        return default(row)
    best = row["decoded"][0][0]
    fired = bool(unseen(row, best)) and any(p >= 0.3 and w not in named(best) for w, p in row["sure"].items())
    n = len(row["decoded"])
    kept = [o for o in row["order"] if o[0] >= n or not (fired and unseen(row, row["decoded"][o[0]][0]))]
    pick = max(kept, key=lambda o: o[1] + (lean if o[0] < n else 0.0))[0]
    return row["decoded"][pick][0] if pick < n else row["retrieved"][pick - n]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("coco_dump")
    parser.add_argument("f8k_dev_dump")
    parser.add_argument("--prepared", type=Path, required=True, help="prepared Flickr8k (Lite0 features)")
    parser.add_argument("--library", required=True, help="the everyday photos the check learns from")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the model the dumps were made with")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model, device="cpu")
    encoder, store = cast(Encoder, captioner.encoder), captioner.datastore
    assert store is not None
    prepared = open_prepared(args.prepared)
    train = prepared.indices("train")
    f8k = prepared.pooled(train)
    f8k_196 = pooled_features(encoder, [Path(prepared.records[i].image) for i in train], 196)
    library = expand_inputs([args.library])
    lib = {size: pooled_features(encoder, library, size) for size in (None, 224, 196)}
    sets = {}
    for name in (args.coco_dump, args.f8k_dev_dump):
        rows = json.loads(Path(name).read_text())
        paths = [Path(__file__).parent / r["image"] for r in rows]  # named relative to scripts/probes/
        for row, sure in zip(rows, concept_probs(captioner, paths)):
            row["order"] = rerank([t for t, _ in row["decoded"]], row["retrieved"][:VOTERS], store.idf, 0.0)
            row["sure"] = sure
        sets[name] = (rows, pooled_features(encoder, paths), pooled_features(encoder, paths, 224))
    variants = {"library as given (256)": ([f8k], [lib[None]]), "library at 224": ([f8k], [lib[224]]),
                "both kinds also at 196 (shipped)": ([f8k, f8k_196], [lib[224], lib[196]])}
    print("| check | l2 | threshold | coco-dev unfamiliar (shrunk to 224) | Flickr8k dev unfamiliar | lean 0: coco-dev "
          "| Flickr8k dev | voters alone: coco-dev | Flickr8k dev |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for variant, (familiar, other) in variants.items():
        for l2 in (1 / 30, 0.1):
            check = fit_familiarity(torch.cat(familiar), torch.cat(other), l2)
            shrunk = {}
            for name, (rows, given, small) in sets.items():
                for row, p in zip(rows, check.unfamiliar(given[:, None])):
                    row["p"] = float(p)
                shrunk[name] = check.unfamiliar(small[:, None])
            for t in (0.8, 0.85, 0.9, 0.95):
                coco, f8k_dev = (sets[n][0] for n in (args.coco_dump, args.f8k_dev_dump))
                fires = [sum(r["p"] > t for r in rows) for rows in (coco, f8k_dev)]
                cells = [f"{fires[0]} ({int((shrunk[args.coco_dump] > t).sum())})", str(fires[1])]
                for lean in (0.0, -1.0):
                    cells += [score(rows, partial(gated, threshold=t, lean=lean)) for rows in (coco, f8k_dev)]
                print(f"| {variant} | {l2:.3g} | {t} | " + " | ".join(cells) + " |", flush=True)
    print("default (the concept check): coco-dev " + score(sets[args.coco_dump][0], default)
          + ", Flickr8k dev " + score(sets[args.f8k_dev_dump][0], default))


if __name__ == "__main__":
    main()
