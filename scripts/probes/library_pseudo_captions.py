"""Probe (not a test): the retrieval decoder trained on a library's pseudo-captions beside Flickr8k's captions.

`captioner adapt` fits only the image embedder to a library's pseudo-captions. This writes the data to try the
other half issue 33 names: the decoder's copy path and new word rows trained on everyday photos too. It
pseudo-captions the library as adapt does (the shipped model's consensus vote over its 25 retrieved captions)
and writes one custom JSONL holding Flickr8k (its official splits) and the library's photos with their
pseudo-caption (split train), over a folder of links to both image folders, so a Flickr8k photo keeps its
own name and training still leaves its own captions out of its neighbours:

    python scripts/probes/library_pseudo_captions.py --library ../shared/data/coco-unlabeled/images \
        --flickr8k ../shared/data/flickr8k --output work/mix
    captioner prepare --config scripts/probes/flickr8k-retrieval-library.yaml
    cp captioner/models/flickr8k-lite0/vocab.json prepared/flickr8k-retrieval-library/vocab.json
    captioner train --config scripts/probes/flickr8k-retrieval-library.yaml
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from captioner.adapt import pseudo_captions
from captioner.data import expand_inputs, load_dataset
from captioner.pipeline import Captioner

LIBRARY_FOLDER = "library"  # the library's links live under this subfolder of the output's images/


def flickr8k_entries(root: Path) -> list[tuple[Path, dict]]:
    """Flickr8k's images with their JSONL object (captions and official split), read by the project's own
    Flickr8k reader."""
    return [(r.image, {"image": r.name, "captions": list(r.captions), "split": r.split})
            for r in load_dataset(root).records if r.split]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--library", type=Path, required=True)
    parser.add_argument("--flickr8k", type=Path, required=True)
    parser.add_argument("--model", default="captioner/models/flickr8k-lite0")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    images = args.output / "images"
    (images / LIBRARY_FOLDER).mkdir(parents=True, exist_ok=True)
    entries = []
    for image, entry in flickr8k_entries(args.flickr8k):
        link = images / entry["image"]
        if not link.exists():
            link.symlink_to(image.resolve())
        entries.append(entry)
    paths = expand_inputs([str(args.library)])
    _, texts, failed = pseudo_captions(Captioner.from_pretrained(args.model, device="cpu"), paths)
    unreadable = set(failed)
    kept = [p for p in paths if p not in unreadable]
    for path, text in zip(kept, texts):
        link = images / LIBRARY_FOLDER / path.name
        if not link.exists():
            link.symlink_to(path.resolve())
        entries.append({"image": f"{LIBRARY_FOLDER}/{path.name}", "caption": text, "split": "train"})
    with open(args.output / "captions.jsonl", "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)
    print(f"{args.output / 'captions.jsonl'}: {len(entries) - len(texts)} Flickr8k images, {len(texts)} library "
          f"photos with pseudo-captions, e.g. " + "; ".join(texts[:3]))


if __name__ == "__main__":
    main()
