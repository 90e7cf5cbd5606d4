"""`captioner evaluate`: coco-caption scores of a trained model, or of a baseline, on one split.

Every image is scored against all of its references. Writes results.json (scores per beam size) and
captions_beamK.json (one caption per image) next to each other, and returns a markdown table.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .baselines import nearest_neighbour_captions
from .config import resolve_device
from .features import open_prepared
from .metrics import score_captions
from .models import check_encoder_spec, load_model
from .train import decode_split


def evaluate_model(model: str | Path, prepared_dir: str | Path, split: str = "test", beam_sizes: Sequence[int] = (1, 3, 5),
                   max_length: int = 20, device: str = "auto", out_dir: str | Path | None = None,
                   log: Callable[[str], None] = print) -> list[tuple[str, dict[str, float]]]:
    """Score `model` on `split` at each beam size; a model with a fine-tuned encoder re-encodes the images."""
    dev = resolve_device(device)
    prepared = open_prepared(prepared_dir)
    loaded = load_model(model, dev)
    if loaded.vocab.itos != prepared.vocab.itos:
        raise ValueError(f"{model} was trained with another vocabulary than {prepared_dir}")
    encoder = None
    if loaded.encoder_state is not None:  # fine-tuned: the cached features are not what it sees
        encoder = loaded.encoder(dev)
    else:
        check_encoder_spec(loaded.encoder_spec, prepared.spec, f"{model} (against {prepared_dir})")
    rows = prepared.indices(split)
    refs = prepared.references(rows)
    out = Path(out_dir) if out_dir else Path(model) / f"eval_{split}"
    out.mkdir(parents=True, exist_ok=True)
    table = []
    for k in beam_sizes:
        start = time.time()
        predictions = decode_split(loaded.decoder, prepared, rows, k, max_length, dev, encoder)
        seconds = time.time() - start
        scores = score_captions(predictions, refs)
        (out / f"captions_beam{k}.json").write_text(json.dumps(predictions, indent=0) + "\n")
        table.append((f"beam {k}", scores))
        log(f"beam {k}: BLEU-4 {100 * scores['Bleu_4']:.1f} CIDEr {100 * scores['CIDEr']:.1f} "
            f"({len(rows)} images decoded in {seconds:.1f}s)")
    results = {"model": str(model), "split": split, "images": len(rows), "max_length": max_length,
               "scores": {name: s for name, s in table}}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return table


def evaluate_nearest_neighbour(prepared_dir: str | Path, split: str = "test", k: int = 25) -> dict[str, float]:
    """Retrieval baseline: captions of the most similar training images, chosen by consensus."""
    prepared = open_prepared(prepared_dir)
    train_rows, rows = prepared.indices("train"), prepared.indices(split)

    def pooled(r: list[int]) -> np.ndarray:
        return np.stack([prepared.features[i].astype(np.float32).mean(axis=0) for i in r])

    chosen = nearest_neighbour_captions(pooled(train_rows), [list(prepared.records[i].captions) for i in train_rows],
                                        pooled(rows), k=k)
    predictions = {prepared.records[r].name: c for r, c in zip(rows, chosen)}
    return score_captions(predictions, prepared.references(rows))

