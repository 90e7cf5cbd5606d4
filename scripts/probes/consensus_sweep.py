"""Consensus reranking at several decoder leans, from dump_candidates.py's files, without running the model:
BLEU-4 and CIDEr (x100; CIDEr's idf from the scored photos' references, as pycocoevalcap) per lean. Lean 1
keeps a beam (the beams reranked), lean -1 a retrieved caption (the voters alone).

    python scripts/probes/dump_candidates.py --set ../shared/data/coco-dev --output /tmp/coco.json
    python scripts/probes/consensus_sweep.py /tmp/coco.json /tmp/f8kdev.json --leans 0,0.05,0.1,0.15,1
"""
from __future__ import annotations

import argparse
import json
from functools import partial

from consensus_gates import score, voted  # the probe beside this one

from captioner.consensus import rerank
from captioner.datastore import load_datastore
from captioner.pipeline import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+")
    parser.add_argument("--leans", default="0,0.05,0.1,0.15,1")
    parser.add_argument("--datastore", default=str(DEFAULT_MODEL / "datastore"), help="whose idf weighs n-grams")
    args = parser.parse_args()
    idf = load_datastore(args.datastore).idf
    print("| lean | " + " | ".join(f"{d} BLEU-4 | {d} CIDEr" for d in args.dumps) + " |")
    rows = {d: json.load(open(d)) for d in args.dumps}
    for rs in rows.values():
        for r in rs:
            r["order"] = rerank([t for t, _ in r["decoded"]], r["retrieved"], idf, 0.0)
    for lean in [float(x) for x in args.leans.split(",")]:
        cells = [score(rs, partial(voted, lean=lean)).replace(" / ", " | ") for rs in rows.values()]
        print(f"| {lean:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
