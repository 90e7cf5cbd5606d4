"""Search quality (not a test): caption a split's photos, then query `captioner search` with each of their
human captions and report recall@1/5/10 of finding the photo, with the captions alone, with the
concepts added to them, and (where the model ships an image embedder) with the photos' image vectors:
alone, mixed with the caption + concepts at search.IMAGE_WEIGHT, and so mixed for every other photo only.

    python scripts/probes/search_recall.py --model captioner/models/flickr8k-lite0 --prepared prepared/flickr8k \
        --split val
    python scripts/probes/search_recall.py --model captioner/models/flickr8k-lite0 --prepared prepared/flickr8k \
        --split test

The photos are captioned from the prepared folder's cached features, as `caption` would (the model's
decoding defaults, concepts included), and their vectors come from the same features, as bulk captioning
writes them; the sentence encoder is MiniLM, as `captioner search` uses. On the dev split (--split val) it
also prints what search.py's IMAGE_SCALE and IMAGE_SHIFT were set from (the caption and image cosines'
mean and spread over all query-photo pairs) and recall against the image vector's weight, which is how
IMAGE_WEIGHT was chosen; the test split is for scoring the weight chosen, not for choosing it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.bulk import encode_vector
from captioner.concepts import Concepts, top_concepts
from captioner.decoding_options import DecodingOptions
from captioner.evaluate import decode_split
from captioner.features import open_prepared
from captioner.models import load_model
from captioner.search import (
    IMAGE_SCALE,
    IMAGE_SHIFT,
    IMAGE_WEIGHT,
    Index,
    build_index,
    nearest,
)
from captioner.sentences import load_sentence_encoder


def recall(index_files: list[str], vectors: np.ndarray, queries: np.ndarray, owners: list[str]) -> dict[str, float]:
    scores = queries.astype(np.float32) @ vectors.astype(np.float32).T
    rank_of = {f: i for i, f in enumerate(index_files)}
    target = scores[np.arange(len(owners)), [rank_of[o] for o in owners]]
    rank = (scores > target[:, None]).sum(axis=1)  # ties count for the photo
    return {f"R@{k}": float((rank < k).mean()) for k in (1, 5, 10)}


def search_recall(index: Index, queries: np.ndarray, owners: list[str], weight: float) -> dict[str, float]:
    """Recall@1/5/10 through search.nearest, as `captioner search` ranks (ties: the earlier line first)."""
    found = [[index.files[i] for i in nearest(index.vectors, q, 10, index.images, weight)[0]] for q in queries]
    return {f"R@{k}": float(np.mean([owner in hits[:k] for owner, hits in zip(owners, found)])) for k in (1, 5, 10)}


def calibration(index: Index, queries: np.ndarray) -> str:
    """The scale and shift that give the image cosines of all query-photo pairs the caption cosines' mean
    and standard deviation (an index whose every row has its image vector)."""
    text = queries.astype(np.float32) @ index.vectors.astype(np.float32).T
    image = queries.astype(np.float32) @ index.images.vectors.astype(np.float32).T
    scale = float(text.std() / image.std())
    return (f"{text.size} query-photo pairs: caption cosine mean {text.mean():.3f} sd {text.std():.3f}, image cosine "
            f"mean {image.mean():.3f} sd {image.std():.3f} -> scale {scale:.3f}, "
            f"shift {text.mean() - scale * image.mean():.3f} "
            f"(search.py: IMAGE_SCALE {IMAGE_SCALE}, IMAGE_SHIFT {IMAGE_SHIFT})")


def row(label: str, scores: dict[str, float]) -> str:
    return f"| {label} | {100 * scores['R@1']:.1f} | {100 * scores['R@5']:.1f} | {100 * scores['R@10']:.1f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="captioner/models/flickr8k-lite0")
    parser.add_argument("--prepared", default="prepared/flickr8k")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    prepared, model = open_prepared(args.prepared), load_model(args.model)
    prepared = dataclasses.replace(prepared, vocab=model.vocab)  # the model writes in its own words
    rows = prepared.indices(args.split)
    concepts = Concepts(*model.imagenet_head(), model.vocab)
    captions = decode_split(model.decoder, prepared, rows, DecodingOptions(**model.decoding), torch.device("cpu"),
                            concepts=concepts, vocab=model.vocab)
    probs = concepts.probs(torch.from_numpy(prepared.features[rows].astype(np.float32)))
    tags = top_concepts(probs, threshold=0.3, k=3)  # the confident ones, as the captions' concepts
    vectors = (model.embedder(torch.from_numpy(prepared.features[rows].astype(np.float32))).numpy()
               if model.embedder is not None else None)
    encoder = load_sentence_encoder()
    queries, owners = [], []
    for r in rows:
        for text in prepared.records[r].captions:
            queries.append(text)
            owners.append(prepared.records[r].name)
    start = time.perf_counter()
    query_vectors = np.concatenate([encoder(queries[s:s + 256]) for s in range(0, len(queries), 256)])
    per_query_ms = 1000 * (time.perf_counter() - start) / len(queries)
    print(f"{len(rows)} photos, {len(queries)} human captions as queries ({per_query_ms:.1f} ms to embed each)")
    print("| photo text | R@1 | R@5 | R@10 |\n| --- | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        def library(name: str, with_tags: bool, with_vector: list[bool]) -> Index:
            jsonl = Path(tmp) / f"{name}.jsonl"
            jsonl.write_text("".join(json.dumps({
                "file": prepared.records[r].name, "captions": [{"generated_text": captions[prepared.records[r].name]}],
                "concepts": [{"word": w, "probability": p} for w, p in tag] if with_tags else [],
                **({"vector": encode_vector(vectors[k])} if has else {})}) + "\n"
                for k, (r, tag, has) in enumerate(zip(rows, tags, with_vector))))
            return build_index(jsonl, encoder, log=lambda s: None)

        for label, with_tags in (("generated caption", False), ("generated caption + concepts", True)):
            index = library(label, with_tags, [False] * len(rows))
            print(row(label, recall(index.files, index.vectors, query_vectors, owners)))
        if vectors is None:
            print(f"{args.model} ships no image embedder (retrieval.safetensors): no rows with image vectors")
            return
        every = library("every", True, [True] * len(rows))
        print(row("image vector alone", search_recall(every, query_vectors, owners, 1.0)))
        print(row(f"caption + concepts + image vector (weight {IMAGE_WEIGHT})",
                  search_recall(every, query_vectors, owners, IMAGE_WEIGHT)))
        half = library("half", True, [k % 2 == 0 for k in range(len(rows))])
        print(row(f"the same, image vectors for every other photo only (weight {IMAGE_WEIGHT})",
                  search_recall(half, query_vectors, owners, IMAGE_WEIGHT)))
        if args.split == "val":
            print("\n" + calibration(every, query_vectors))
            print("\nimage vector's weight on the dev split (caption + concepts + image vector)\n"
                  "| weight | R@1 | R@5 | R@10 |\n| ---: | ---: | ---: | ---: |")
            for weight in np.linspace(0.0, 1.0, 21):
                print(row(f"{weight:.2f}", search_recall(every, query_vectors, owners, float(weight))))


if __name__ == "__main__":
    main()
