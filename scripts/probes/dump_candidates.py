"""Dump, per photo of a scored set, what a caption could be chosen from: the model's n-best captions (with
their scores) and the consensus.VOTERS captions its retrieval ranks first (text, cosine, stored vector),
as `--consensus` retrieves them, with the human references. Choosing between them afterwards (consensus
reranking) needs no model run:

    python scripts/probes/dump_candidates.py --set ../shared/data/coco-dev --output /tmp/coco.json
    python scripts/probes/dump_candidates.py --set ../shared/data/flickr8k --split val --output /tmp/f8k.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from eval_everyday import read_set  # the probe beside this one

from captioner.data import load_image
from captioner.pipeline import Captioner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--model")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    refs = read_set(Path(args.set), args.split)
    captioner = Captioner.from_pretrained(args.model, device="cpu")
    # the beams as searched: no choice among them and the voters (a model whose default votes, as `adapt`'s
    # does, would otherwise dump the vote's winners, voters' among them)
    opts = captioner.options(beam_size=args.beam_size, num_captions=args.beam_size, consensus=False,
                             concept_check=False, unfamiliar_threshold=1.0)
    store = captioner.datastore
    rows = []
    paths = list(refs)
    for s in range(0, len(paths), 16):
        batch = paths[s:s + 16]
        images = [load_image(p) for p in batch]
        with torch.inference_mode():  # what `--consensus` retrieves: the memory's captions and the voters
            features = captioner.encoder.regions(torch.stack([captioner.encoder.preprocess(im) for im in images]))
            _, found = captioner.retrieved(features, captioner.options(consensus=True))
        results = captioner.generate(images, opts)
        for i, (p, r) in enumerate(zip(batch, results)):
            rows.append({"image": str(p), "refs": refs[p],
                         "decoded": [[captioner.words.decode(c.tokens), c.score] for c in r.captions],
                         "retrieved": found.texts[i], "cosine": found.similarity[i].tolist(),
                         "vectors": np.round(store.table[:, found.rows[i]].T, 4).tolist()})
        print(f"{len(rows)}/{len(paths)}", flush=True)
    Path(args.output).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
