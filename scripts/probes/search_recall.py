"""Search quality (not a test): caption a split's photos, then query `captioner search` with each of their
human captions and report recall@1/5/10 of finding the photo, with the captions alone, with the
concepts added to them, and (where the model ships an image embedder) with the photos' image vectors:
alone, mixed with the caption + concepts at search.IMAGE_WEIGHT, and so mixed for every other photo only.
It also queries single words (ONE-WORD QUERIES, below) and reports, per image weight, their precision@10 and
average precision beside the sentences' recall@5.

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

ONE-WORD QUERIES: the words of the concept vocabulary (concepts.concept_table().vocabulary, the object words
ImageNet's classes map to) that at least MIN_RELEVANT of the split's photos are relevant to, each queried
alone through search.search_rows, as `captioner search` and /api/search rank (MATCH_BONUS included), top
DEPTH. A photo is relevant to a word when at least MIN_CAPTIONS of its human captions contain it, in any
case or as its plural or singular (search.forms, the forms MATCH_BONUS matches). Precision@10 and average
precision (over the top DEPTH: the sum of precision@k at each relevant hit, over min(relevant, DEPTH)) are
averaged over the words. Any prepared folder of the model's encoder (features.json's spec) serves, whatever
its vocabulary: the script captions with the model's own (prepared/flickr8k-retrieval holds the same
Flickr8k Lite0 features as prepared/flickr8k).
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
from captioner.concepts import Concepts, concept_table, top_concepts
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
    forms,
    nearest,
    search_rows,
    words,
)
from captioner.sentences import SentenceEncoder, load_sentence_encoder

MIN_CAPTIONS = 2  # of a photo's human captions that must contain a word for the photo to be relevant to it
MIN_RELEVANT = 5  # photos of the split a concept word must be relevant to, to be queried
DEPTH = 100  # hits a one-word query ranks, for average precision
WEIGHTS = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 1.0)  # the image weights of the one-word table


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


def word_queries(captions: dict[str, list[str]]) -> dict[str, set[str]]:
    """Each concept word MIN_RELEVANT or more photos are relevant to -> those photos (`captions`: photo -> its
    human captions): the photos with MIN_CAPTIONS or more captions that contain the word (search.forms)."""
    said = {photo: [set(words(text)) for text in texts] for photo, texts in captions.items()}
    queries = {}
    for word in concept_table().vocabulary:
        wanted = forms(word)
        relevant = {photo for photo, sets in said.items() if sum(bool(s & wanted) for s in sets) >= MIN_CAPTIONS}
        if len(relevant) >= MIN_RELEVANT:
            queries[word] = relevant
    return queries


def word_precision(index: Index, encoder: SentenceEncoder, queries: dict[str, set[str]],
                   weight: float) -> dict[str, float]:
    """Mean precision@10 and average precision (top DEPTH) of the one-word queries through search_rows."""
    p10, ap = [], []
    for word, relevant in queries.items():
        hits = [index.files[row] in relevant for row in search_rows(index, encoder, word, DEPTH, weight)[0]]
        p10.append(np.mean(hits[:10]))
        found = np.cumsum(hits)
        ap.append(sum(found[k] / (k + 1) for k, hit in enumerate(hits) if hit) / min(len(relevant), DEPTH))
    return {"P@10": float(np.mean(p10)), "AP": float(np.mean(ap))}


def remembering(encoder: SentenceEncoder, texts: list[str]) -> SentenceEncoder:
    """The encoder, with `texts` embedded once up front (each query is asked at every weight)."""
    known = dict(zip(texts, encoder(texts)))
    return lambda asked: np.stack([known[t] if t in known else encoder([t])[0] for t in asked])


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
        relevant = word_queries({prepared.records[r].name: prepared.records[r].captions for r in rows})
        sizes = sorted(len(v) for v in relevant.values())
        print(f"\none-word queries: {len(relevant)} concept words, each relevant to {MIN_RELEVANT}+ photos "
              f"({MIN_CAPTIONS}+ of a photo's {len(prepared.records[rows[0]].captions)} human captions contain it); "
              f"relevant photos per word: median {sizes[len(sizes) // 2]}, {sizes[0]} to {sizes[-1]}\n"
              f"{', '.join(relevant)}\n"
              f"| weight | sentences R@5 | one word P@10 | one word AP@{DEPTH} |\n| ---: | ---: | ---: | ---: |")
        said = remembering(encoder, list(relevant))
        for weight in WEIGHTS:
            sentence = search_recall(every, query_vectors, owners, weight)
            word = word_precision(every, said, relevant, weight)
            print(f"| {weight} | {100 * sentence['R@5']:.1f} | {100 * word['P@10']:.1f} | {100 * word['AP']:.1f} |")


if __name__ == "__main__":
    main()
