"""Score captioning methods on photos with human captions: a model (any decoding options), or retrieval
alone from a caption datastore (the nearest caption, or the consensus recipe of issue 33's probe).

    python scripts/probes/eval_everyday.py --set ../shared/data/coco-dev --method model --model runs/x/best
    python scripts/probes/eval_everyday.py --set ../shared/data/coco-dev --method consensus --datastore DIR
    python scripts/probes/eval_everyday.py --set ../shared/data/flickr8k --split test --method model --no-concepts
    python scripts/probes/eval_everyday.py --set ../shared/data/coco-dev --method model --resize 640 480

A set is a folder with captions.jsonl ({"image", "captions"}) and images/, or a Flickr8k folder with
--split. Prints one Markdown row: BLEU-1..4, METEOR, ROUGE-L, CIDEr (x100), words used, distinct captions;
--output writes the captions and scores as JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from captioner.concepts import concept_table
from captioner.config import add_decoding_flags, flags_given
from captioner.data import load_image
from captioner.datastore import load_datastore
from captioner.metrics import fluency, score_captions
from captioner.pipeline import Captioner
from captioner.vocab import tokenize

METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def read_set(folder: Path, split: str) -> dict[Path, list[str]]:
    """{image path: its reference captions}."""
    if (folder / "captions.jsonl").is_file():
        rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line.strip()]
        return {folder / "images" / r["image"]: r["captions"] for r in rows}
    names = {"train": "trainImages", "val": "devImages", "test": "testImages"}[split]
    wanted = set((folder / f"Flickr_8k.{names}.txt").read_text().split())
    refs: dict[Path, list[str]] = {}
    for line in (folder / "Flickr8k.token.txt").read_text().splitlines():
        key, _, caption = line.partition("\t")
        name = key.rpartition("#")[0]
        if name in wanted:
            refs.setdefault(folder / "images" / name, []).append(caption)
    return refs


def named_concepts(captions: list[list[str]], probs: np.ndarray, words: list[str]) -> np.ndarray:
    """(B, n): per photo, for each of its n captions, the summed probability (probs (B, W) of `words`) of the
    concept words the caption names."""
    column = {word: j for j, word in enumerate(words)}
    out = np.zeros((len(captions), max((len(c) for c in captions), default=0)), dtype=np.float32)
    for i, texts in enumerate(captions):
        for j, text in enumerate(texts):
            named = list({column[w] for w in tokenize(text) if w in column})
            out[i, j] = float(probs[i, named].sum()) if named else 0.0
    return out


def consensus(vectors: np.ndarray, datastore, concept_probs: np.ndarray | None, pool: int, top: int,
              bonus: float) -> list[str]:
    """Issue 33's probe: of the `pool` nearest captions, add bonus x the summed probability of the concept
    words each contains, then of the `top` best return the one closest on average to the others."""
    found = datastore.search(vectors, pool)
    scores = found.similarity.copy()
    if concept_probs is not None and bonus:  # the probe's scoring, over the pool only
        scores += bonus * named_concepts(found.texts, concept_probs, concept_table().vocabulary)
    out = []
    for rows, score, texts in zip(found.rows, scores, found.texts):
        best = np.argsort(-score, kind="stable")[:top]
        if top == 1:
            out.append(texts[best[0]])
            continue
        v = datastore.table[:, rows[best]].T
        v = v / np.linalg.norm(v, axis=1, keepdims=True)  # only the voters, not the whole table per batch
        mean = ((v @ v.T).sum(axis=1) - 1.0) / (len(best) - 1)
        out.append(texts[best[int(np.argmax(mean))]])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", required=True, help="captions.jsonl + images/, or a Flickr8k folder")
    parser.add_argument("--split", default="test", help="Flickr8k split (default: test)")
    parser.add_argument("--method", default="model", choices=["model", "nearest", "consensus"])
    parser.add_argument("--model", help="model folder (default: the shipped model); for nearest/consensus the "
                        "model whose image embedder and concepts are used")
    parser.add_argument("--datastore", help="datastore folder (a retrieval model's own by default)")
    add_decoding_flags(parser)  # --method model: every decoding option, as `captioner caption` takes it
    parser.add_argument("--pool", type=int, default=500, help="consensus: nearest captions re-ranked")
    parser.add_argument("--top", type=int, default=25, help="consensus: captions voting")
    parser.add_argument("--bonus", type=float, default=0.3, help="consensus: weight of the concept words")
    parser.add_argument("--resize", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"), help="resize every photo to "
                        "WIDTH x HEIGHT (bicubic) before captioning: how far a score moves when the same photos "
                        "arrive at another size or shape, as full-resolution photos do")
    parser.add_argument("--name", default="", help="the row's name")
    parser.add_argument("--output", help="JSON file for captions and scores")
    args = parser.parse_args()

    refs = read_set(Path(args.set), args.split)
    retrieval_only = args.method != "model"
    captioner = Captioner.from_pretrained(args.model, device="cpu",
                                          datastore=args.datastore if not retrieval_only else None)
    datastore = load_datastore(args.datastore) if retrieval_only else None
    predictions: dict[str, str] = {}
    paths = list(refs)
    start = time.time()
    opts = captioner.options(**flags_given(args))
    for s in range(0, len(paths), 16):
        batch = paths[s:s + 16]
        images = [load_image(p) for p in batch]
        if args.resize:
            images = [im.resize(tuple(args.resize), Image.Resampling.BICUBIC) for im in images]
        if retrieval_only:
            with torch.inference_mode():
                pixels = torch.stack([captioner.encoder.preprocess(im) for im in images])
                features = captioner.encoder.regions(pixels)
                vectors = captioner.embedder(features).numpy()
                probs = captioner.concepts.probs(features).numpy() if captioner.concepts is not None else None
            texts = consensus(vectors, datastore, probs, args.pool, 1 if args.method == "nearest" else args.top,
                              0.0 if args.method == "nearest" else args.bonus)
        else:
            texts = [captioner.as_dicts(r.captions)[0]["generated_text"] for r in captioner.generate(images, opts)]
        predictions.update({str(p): t for p, t in zip(batch, texts)})
    seconds = time.time() - start
    scores = score_captions(predictions, {str(p): c for p, c in refs.items()})
    flu = fluency([" ".join(tokenize(t)) for t in predictions.values()])
    name = args.name or args.method
    print(f"| {name} | " + " | ".join(f"{100 * scores[m]:.1f}" for m in METRICS)
          + f" | {flu['vocabulary']} | {flu['distinct_captions']} |")
    print(f"{len(predictions)} images in {seconds:.1f} s", file=sys.stderr)
    if args.output:
        Path(args.output).write_text(json.dumps({"scores": scores, "fluency": flu, "captions": predictions},
                                                indent=1) + "\n")


if __name__ == "__main__":
    main()
