"""Probe (not a test): how often the concept check replaced a caption in a bulk run over a library, and how many
captions still name a thing the head reliably sees but gave under concepts.UNSEEN (judged from the concepts
each line returns, those of probability concepts.SHOWN or more).

    captioner caption ../shared/data/coco-unlabeled/images --output /tmp/library.jsonl
    python scripts/probes/check_on_library.py /tmp/library.jsonl
"""
from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from pathlib import Path

from captioner.concepts import UNSEEN, named, reliably_seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("jsonl", type=Path, help="a bulk run's output (`captioner caption DIR --output FILE.jsonl`)")
    parser.add_argument("--sample", type=int, default=12, help="replaced captions printed (seed 0)")
    args = parser.parse_args()
    lines = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    captioned = [line for line in lines if line.get("captions")]
    replaced = [line for line in captioned if line["captions"][0].get("source") == "datastore"]
    naming, unseen = Counter(), Counter()
    for line in captioned:
        head = {c["word"]: c["probability"] for c in line["concepts"]}
        for word in named(line["captions"][0]["generated_text"]) & reliably_seen():
            naming[word] += 1
            unseen[word] += head.get(word, 0.0) < UNSEEN
    print(f"{len(captioned)} photos captioned; the concept check replaced {len(replaced)} captions "
          f"({100 * len(replaced) / max(len(captioned), 1):.1f}%)")
    for word, n in naming.most_common():
        print(f"{n} captions name {word}; in {unseen[word]} of them the head gives it under {UNSEEN}")
    for line in random.Random(0).sample(replaced, min(args.sample, len(replaced))):
        tags = ", ".join(c["word"] for c in line["concepts"][:3])
        print(f"{Path(line['file']).name}: {line['captions'][0]['generated_text']} ({tags})")


if __name__ == "__main__":
    main()
