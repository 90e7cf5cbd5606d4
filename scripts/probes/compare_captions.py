"""Two runs' captions of the same photos compared photo by photo: how many changed, how many of those score
better or worse (CIDEr-D, the idf from the photos' own references), and a bootstrap interval on the mean
change, so a gain of a point or two on 167 photos can be told from chance.

    python scripts/probes/eval_everyday.py --set ../shared/data/coco-dev --method model --output /tmp/a.json \\
        --unfamiliar-threshold 1
    python scripts/probes/eval_everyday.py --set ../shared/data/coco-dev --method model --output /tmp/b.json
    python scripts/probes/compare_captions.py /tmp/a.json /tmp/b.json --set ../shared/data/coco-dev
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from eval_everyday import read_set  # the probe beside this one

from captioner.cider import CiderD
from captioner.vocab import tokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="eval_everyday.py --output file of the first run")
    parser.add_argument("after", help="the same of the second run")
    parser.add_argument("--set", required=True, help="the scored set (its references)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--draws", type=int, default=2000, help="bootstrap resamples of the photos")
    args = parser.parse_args()
    refs = {Path(p).name: [" ".join(tokenize(c)).split() for c in caps]
            for p, caps in read_set(Path(args.set), args.split).items()}
    runs = [{Path(p).name: c for p, c in json.loads(Path(f).read_text())["captions"].items()}
            for f in (args.before, args.after)]
    names = sorted(runs[0])
    if sorted(runs[1]) != names:
        raise SystemExit(f"{args.before} and {args.after} caption different photos")
    cider = CiderD({n: refs[n] for n in names})
    before, after = (cider.score(names, [" ".join(tokenize(run[n])).split() for n in names]) for run in runs)
    change = after - before
    changed = sum(runs[0][n] != runs[1][n] for n in names)
    draws = np.random.default_rng(0).integers(0, len(names), (args.draws, len(names)))
    low, high = np.percentile(change[draws].mean(axis=1), [5, 95]) * 100
    print(f"{len(names)} photos, {changed} captions changed: {(change > 1e-9).sum()} score better, "
          f"{(change < -1e-9).sum()} worse; CIDEr-D {100 * before.mean():.1f} -> {100 * after.mean():.1f}, "
          f"mean change {100 * change.mean():+.1f} (90% bootstrap interval {low:+.1f} to {high:+.1f})")


if __name__ == "__main__":
    main()
