"""Search quality (not a test): caption a split's photos, then query `captioner search` with each of their
human captions and report recall@1/5/10 of finding the photo, with the captions alone and with the
concepts added to them.

    python scripts/search_recall.py --model captioner/models/flickr8k-lite0 --prepared prepared/flickr8k --split test

The photos are captioned from the prepared folder's cached features, as `caption` would (the model's
decoding defaults, concepts included); the sentence encoder is MiniLM, as `captioner search` uses.
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

from captioner.concepts import Concepts, top_concepts
from captioner.decoding_options import DecodingOptions
from captioner.evaluate import decode_split
from captioner.features import open_prepared
from captioner.models import load_model
from captioner.search import build_index
from captioner.sentences import load_sentence_encoder


def recall(index_files: list[str], vectors: np.ndarray, queries: np.ndarray, owners: list[str]) -> dict[str, float]:
    scores = queries.astype(np.float32) @ vectors.astype(np.float32).T
    rank_of = {f: i for i, f in enumerate(index_files)}
    target = scores[np.arange(len(owners)), [rank_of[o] for o in owners]]
    rank = (scores > target[:, None]).sum(axis=1)  # ties count for the photo
    return {f"R@{k}": float((rank < k).mean()) for k in (1, 5, 10)}


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
        for label, with_tags in (("generated caption", False), ("generated caption + concepts", True)):
            jsonl = Path(tmp) / f"{with_tags}.jsonl"
            jsonl.write_text("".join(json.dumps({
                "file": prepared.records[r].name, "captions": [{"generated_text": captions[prepared.records[r].name]}],
                "concepts": [{"word": w, "probability": p} for w, p in tag] if with_tags else []}) + "\n"
                for r, tag in zip(rows, tags)))
            index = build_index(jsonl, encoder, log=lambda s: None)
            scores = recall(index.files, index.vectors, query_vectors, owners)
            print(f"| {label} | {100 * scores['R@1']:.1f} | {100 * scores['R@5']:.1f} | {100 * scores['R@10']:.1f} |")


if __name__ == "__main__":
    main()
