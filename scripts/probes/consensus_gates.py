"""Consensus for some photos only: which photos' captions the 25 retrieved captions may vote on, from
dump_candidates.py's files, without running the decoder again (the ImageNet head's concept probabilities are
computed here from the photos). BLEU-4 / CIDEr (x100, CIDEr's idf from the scored photos' references) per
rule, one column per dump.

A rule is a gate: where it fires, the beams and the voters compete (consensus.rerank, the gate's lean);
elsewhere the decoder's best caption stands. The gates tried:
  missed@T   the decoder's best caption leaves out a concept word of probability >= T (the ImageNet head
             is sure of something the caption does not say);
  flickr8k   a share of the voters comes from the decoder's own training captions (the photo looks like
             Flickr8k), turned into a lean.
  check      the concept check (decoding.chosen): the caption names a concept word the head gives under
             concepts.UNSEEN and leaves out one of at least a threshold; the words counted are those the head
             sees in at least a share of the Flickr8k train photos whose captions name them (concept_recall.tsv;
             share 0: every concept word); "no sure concept needed" drops the second half. Where it fires
             the voters alone choose (lean -1).

    python scripts/probes/dump_candidates.py --set ../shared/data/coco-dev --output /tmp/coco.json
    python scripts/probes/dump_candidates.py --set ../shared/data/flickr8k --split val --output /tmp/f8kdev.json
    python scripts/probes/consensus_gates.py /tmp/coco.json /tmp/f8kdev.json
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
from pycocoevalcap.bleu.bleu import Bleu

from captioner.cider import CiderD
from captioner.concepts import RECALL_FILE, UNSEEN, concept_table, named, read_recall
from captioner.consensus import VOTERS, rerank
from captioner.data import load_image
from captioner.pipeline import DEFAULT_MODEL, Captioner
from captioner.vocab import tokenize

Row = dict  # one photo of a dump, with "order" (the vote at lean 0), "sure" and "own" added here


def concept_probs(captioner: Captioner, images: list[Path]) -> list[dict[str, float]]:
    """Per photo, the concept words of probability >= 0.1."""
    words, out = concept_table().vocabulary, []
    assert captioner.concepts is not None
    for s in range(0, len(images), 16):
        with torch.inference_mode():
            batch = torch.stack([captioner.encoder.preprocess(load_image(p)) for p in images[s:s + 16]])
            probs = captioner.concepts.probs(captioner.encoder.regions(batch)).numpy()
        out += [{words[j]: float(p[j]) for j in np.flatnonzero(p >= 0.1)} for p in probs]
    return out


def score(rows: list[Row], choose: Callable[[Row], str]) -> str:
    refs = {str(i): [" ".join(tokenize(c)) for c in r["refs"]] for i, r in enumerate(rows)}
    chosen = [" ".join(tokenize(choose(r))) for r in rows]
    cider = CiderD({k: [c.split() for c in v] for k, v in refs.items()}).score(list(refs), [c.split() for c in chosen])
    bleu, _ = Bleu(4).compute_score(refs, {str(i): [c] for i, c in enumerate(chosen)}, verbose=0)
    return f"{100 * bleu[3]:.1f} / {100 * cider.mean():.1f}"


def voted(row: Row, lean: float) -> str:
    n = len(row["decoded"])
    best = max(row["order"], key=lambda p: p[1] + (lean if p[0] < n else 0.0))[0]
    return row["decoded"][best][0] if best < n else row["retrieved"][best - n]


def missed(row: Row, threshold: float) -> bool:
    said = set(tokenize(row["decoded"][0][0]))
    return any(p >= threshold and word not in said for word, p in row["sure"].items())


def gated(row: Row, threshold: float, lean: float) -> str:
    return voted(row, lean) if missed(row, threshold) else row["decoded"][0][0]


def checked(row: Row, reliable: frozenset[str], sure: float | None) -> str:
    said = named(row["decoded"][0][0])
    unseen = {w for w in said & reliable if row["sure"].get(w, 0.0) < UNSEEN}
    left_out = sure is None or any(p >= sure and word not in said for word, p in row["sure"].items())
    return voted(row, -1.0) if unseen and left_out else row["decoded"][0][0]


def by_share(row: Row, scale: float) -> str:
    return voted(row, scale * row["own"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="the model the dumps were made with")
    args = parser.parse_args()
    captioner = Captioner.from_pretrained(args.model, device="cpu")
    store = captioner.datastore
    assert store is not None
    own = {c for c, g in zip(store.captions, store.groups) if store.group_names[g].startswith("Flickr8k:")}
    sets: dict[str, list[Row]] = {}
    for name in args.dumps:
        rows = json.loads(Path(name).read_text())
        # the dumps name their photos relative to scripts/probes/, where dump_candidates.py runs from
        probs = concept_probs(captioner, [Path(__file__).parent / r["image"] for r in rows])
        for row, sure in zip(rows, probs):
            voters = row["retrieved"][:VOTERS]
            row["order"] = rerank([t for t, _ in row["decoded"]], voters, store.idf, 0.0)
            row["sure"], row["own"] = sure, float(np.mean([v in own for v in voters]))
        sets[name] = rows
    rules: dict[str, Callable[[Row], str]] = {
        "the decoder's best (the default)": lambda r: r["decoded"][0][0],
        "consensus everywhere, lean 0.1 (--consensus)": lambda r: voted(r, 0.1),
    }
    for t in (0.3, 0.5, 0.7):
        for lean in (0.0, 0.1):
            rules[f"missed@{t}, lean {lean}"] = partial(gated, threshold=t, lean=lean)
    for share in (0.0, 0.3, 0.5, 0.7):
        reliable = read_recall(RECALL_FILE, share) if share else frozenset(concept_table().vocabulary)
        for sure in (0.3, 0.5, None):
            rules[f"check: words seen in {share:.0%} of their photos, " + (f"sure@{sure}" if sure else "no sure "
                  "concept needed")] = partial(checked, reliable=reliable, sure=sure)
    for scale in (0.1, 0.2, 0.3):
        rules[f"flickr8k: lean {scale} x the voters' Flickr8k share"] = partial(by_share, scale=scale)
    print("| gate | " + " | ".join(f"{Path(n).stem} BLEU-4 / CIDEr" for n in sets) + " |")
    print("| --- |" + " ---: |" * len(sets))
    for name, rule in rules.items():
        print(f"| {name} | " + " | ".join(score(rows, rule) for rows in sets.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
