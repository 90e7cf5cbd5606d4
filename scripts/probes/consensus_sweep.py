"""Consensus reranking at several decoder leans, from dump_candidates.py's files, without running the model:
BLEU-4 and CIDEr (x100; CIDEr's idf from the scored photos' references, as pycocoevalcap) per lean. Lean 1
keeps a beam (the beams reranked), lean -1 a retrieved caption (the voters alone).

    python scripts/probes/dump_candidates.py --set ../shared/data/coco-dev --output /tmp/coco.json
    python scripts/probes/consensus_sweep.py /tmp/coco.json /tmp/f8kdev.json --leans 0,0.05,0.1,0.15,1
"""
from __future__ import annotations

import argparse
import json

from pycocoevalcap.bleu.bleu import Bleu

from captioner.cider import CiderD
from captioner.consensus import rerank
from captioner.datastore import load_datastore
from captioner.pipeline import DEFAULT_MODEL
from captioner.vocab import tokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+")
    parser.add_argument("--leans", default="0,0.05,0.1,0.15,1")
    parser.add_argument("--datastore", default=str(DEFAULT_MODEL / "datastore"), help="whose idf weighs n-grams")
    args = parser.parse_args()
    idf = load_datastore(args.datastore).idf
    print("| lean | " + " | ".join(f"{d} BLEU-4 | {d} CIDEr" for d in args.dumps) + " |")
    rows = {d: json.load(open(d)) for d in args.dumps}
    ranked = {d: [rerank([t for t, _ in r["decoded"]], r["retrieved"], idf, 0.0) for r in rs] for d, rs in rows.items()}
    for lean in [float(x) for x in args.leans.split(",")]:
        cells = []
        for d, rs in rows.items():
            refs = {str(i): [" ".join(tokenize(c)) for c in r["refs"]] for i, r in enumerate(rs)}
            chosen = []
            for r, order in zip(rs, ranked[d]):
                n = len(r["decoded"])
                best = max(order, key=lambda p: p[1] + (lean if p[0] < n else 0.0))[0]
                chosen.append(" ".join(tokenize(r["decoded"][best][0] if best < n else r["retrieved"][best - n])))
            cider = CiderD({k: [c.split() for c in v] for k, v in refs.items()})
            c = cider.score(list(refs), [x.split() for x in chosen]).mean()
            b, _ = Bleu(4).compute_score(refs, {str(i): [x] for i, x in enumerate(chosen)}, verbose=0)
            cells.append(f"{100 * b[3]:.1f} | {100 * c:.1f}")
        print(f"| {lean:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
