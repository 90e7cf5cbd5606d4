"""Held-out concepts (not a test): can a detector of caption words, learned on the training split, find
the eight held-out concepts through their GloVe neighbours (the transfer of DCC, Hendricks et al., 2016)?
Compared, as taggers on the dev split, with the encoder's ImageNet head (concepts.py: over the mean of
the regions; also over each region, averaging a concept's 5 most probable regions, for small objects)
and the larger of head and detector. `--heads` adds the ImageNet heads of other encoders, run over the
dev photos themselves (EfficientNet-Lite1 and Lite2 are the only other pretrained weights reachable
here), and the last row takes each concept's best F1 over every row: a ceiling for any choice among them.

    python scripts/probes/heldout_word_detector.py --prepared prepared/flickr8k-heldout \
        --model runs/flickr8k-heldout/best --heads efficientnet_lite1,efficientnet_lite2

The detector: one logistic regression per caption word that at least --min-images training photos
mention, over the mean and the maximum of the 49 region features (standardised), trained with Adam on
binary cross-entropy. A held-out concept's probability is its nearest detector word's (GloVe cosine),
times that cosine. F1 as in heldout_concepts.py: a photo is a positive when a reference mentions the
concept's words.
"""
from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch
from heldout_concepts import CONCEPTS, f1, mentions

from captioner.concepts import Concepts, concept_probs, concept_table
from captioner.encoders import create_encoder, pretrained_head
from captioner.features import Prepared, image_inputs, open_prepared
from captioner.models import load_model
from captioner.models.lstm import glove_vectors
from captioner.vocab import tokenize


def pooled(prepared: Prepared, rows: list[int]) -> torch.Tensor:
    """(N, 2C): the mean and the maximum of each photo's region features."""
    parts = []
    for start in range(0, len(rows), 500):
        features = torch.from_numpy(prepared.features[rows[start:start + 500]].astype(np.float32))
        parts.append(torch.cat([features.mean(1), features.amax(1)], dim=1))
    return torch.cat(parts)


def head_probs(name: str, prepared: Prepared, rows: list[int]) -> torch.Tensor:
    """(N, W) concept probabilities from encoder `name`'s own ImageNet head, read as concepts.py reads
    the shipped encoder's, over the photos' regions."""
    encoder = create_encoder(name)
    concepts = Concepts(*pretrained_head(encoder.spec()), prepared.vocab)
    inputs = image_inputs(encoder, prepared, torch.device("cpu"))
    with torch.no_grad():
        return torch.cat([concepts.probs(encoder.regions(inputs(np.array(rows[start:start + 50]))))
                          for start in range(0, len(rows), 50)])


def train_detector(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], y.shape[1])
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(256):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(linear(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return linear


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", required=True)
    parser.add_argument("--model", required=True, help="a model folder, for its ImageNet head")
    parser.add_argument("--min-images", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--heads", default="", help="other encoders whose ImageNet heads to add, comma-separated")
    args = parser.parse_args()
    prepared = open_prepared(args.prepared)
    train, dev = prepared.indices("train"), prepared.indices("val")

    def words_of(row: int) -> set[str]:
        return {w for caption in prepared.records[row].captions for w in tokenize(caption)}

    counts = Counter(w for r in train for w in words_of(r))
    words = sorted(w for w, n in counts.items() if n >= args.min_images)
    column = {w: j for j, w in enumerate(words)}
    labels = torch.zeros(len(train), len(words))
    for i, r in enumerate(train):
        for w in words_of(r) & column.keys():
            labels[i, column[w]] = 1.0
    x_train, x_dev = pooled(prepared, train), pooled(prepared, dev)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-3
    detector = train_detector((x_train - mean) / std, labels, args.epochs)
    with torch.no_grad():
        detected = torch.sigmoid(detector((x_dev - mean) / std))
    vectors = glove_vectors(list(CONCEPTS) + words)
    vectors = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-6)
    model = load_model(args.model)
    concepts = Concepts(*model.imagenet_head(), model.vocab)
    features = torch.from_numpy(prepared.features[dev].astype(np.float32))
    head = concepts.probs(features)
    per_region = concept_probs((features @ concepts.weight.T + concepts.bias).flatten(0, 1)).view(
        len(dev), features.shape[1], -1).topk(5, dim=1).values.mean(dim=1)
    names = concept_table().vocabulary
    refs = prepared.references(dev)
    print(f"{len(words)} detector words from {len(train)} training photos; dev: {len(dev)} photos")
    probs: dict[str, dict[str, torch.Tensor]] = {"ImageNet head": {}, "ImageNet head, 5 best regions": {},
                                                 "detector, nearest word": {}, "head or detector, the larger": {}}
    for k, concept in enumerate(CONCEPTS):
        similar = vectors[k] @ vectors[len(CONCEPTS):].T
        cosine, nearest = similar.max(dim=0)
        print(f"{concept}: nearest detector word {words[int(nearest)]!r} (cosine {float(cosine):.2f})")
        imagenet = head[:, names.index(concept)] if concept in names else torch.zeros(len(dev))
        transfer = detected[:, int(nearest)] * float(cosine)
        probs["ImageNet head"][concept] = imagenet
        probs["ImageNet head, 5 best regions"][concept] = (per_region[:, names.index(concept)] if concept in names
                                                           else torch.zeros(len(dev)))
        probs["detector, nearest word"][concept] = transfer
        probs["head or detector, the larger"][concept] = torch.maximum(imagenet, transfer)
    for name in filter(None, args.heads.split(",")):
        other = head_probs(name, prepared, dev)
        probs[f"{name}'s ImageNet head"] = {c: other[:, names.index(c)] if c in names else torch.zeros(len(dev))
                                            for c in CONCEPTS}
    print("\n| tagger (dev) | threshold | mean F1 | " + " | ".join(CONCEPTS) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in CONCEPTS) + " |")
    actual = {concept: [mentions(" ".join(refs[n]), set(text.split())) for n in refs]
              for concept, text in CONCEPTS.items()}
    best = np.zeros(len(CONCEPTS))
    for label, by_concept in probs.items():
        for threshold in (0.05, 0.1, 0.2, 0.3, 0.5):
            scores = [f1([bool(p >= threshold) for p in by_concept[concept].tolist()], actual[concept])[2]
                      for concept in CONCEPTS]
            best = np.maximum(best, scores)
            print(f"| {label} | {threshold} | {100 * np.mean(scores):.1f} | "
                  + " | ".join(f"{100 * s:.0f}" for s in scores) + " |")
    print(f"| each concept's best row (a ceiling) | | {100 * best.mean():.1f} | "
          + " | ".join(f"{100 * s:.0f}" for s in best) + " |")


if __name__ == "__main__":
    main()
