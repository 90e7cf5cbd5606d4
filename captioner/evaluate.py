"""`captioner evaluate`: coco-caption scores of a trained model, or of a baseline, on one split.

Every image is scored against all of its references, with the captions users would get (the model's
decoding options). Writes results.json (scores and fluency figures per beam size, the decoding options)
and captions_beamK.json (one caption per image) next to each other, logs the fluency table (with one
human reference per image for comparison), and returns the scores' rows.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .atomic import replace_file
from .baselines import nearest_neighbour_captions
from .concepts import Concepts, concept_table
from .decoding import Ensemble, beam_search, chosen, search_options, voters_needed
from .decoding_options import DecodingOptions
from .encoders import Encoder
from .familiarity import Familiarity, unfamiliar_photos
from .features import DONE, Prepared, image_inputs, open_prepared
from .metrics import fluency, format_fluency_table, score_captions
from .models import Decoder, check_encoder_spec, load_model, model_datastore
from .runtime import resolve_device
from .vocab import Vocab, tokenize

if TYPE_CHECKING:
    from .datastore import Datastore
    from .models.embedder import ImageEmbedder
    from .models.retrieval import RetrievalLSTM


@torch.inference_mode()
def decode_split(decoder: nn.Module, prepared: Prepared, rows: list[int], opts: DecodingOptions,
                 device: torch.device, encoder: Encoder | None = None, batch_size: int = 100,
                 concepts: Concepts | None = None, vocab: Vocab | None = None,
                 memory: np.ndarray | None = None, voters: dict[int, list[str]] | None = None,
                 store: Datastore | None = None, familiarity: Familiarity | None = None) -> dict[str, str]:
    """Caption the given rows with `opts`, {image name: best caption}: from cached features, or from the
    images through `encoder` once stage 2 has changed it; with `concepts` (and opts.concepts) as
    `caption` does (concepts.py). `vocab`: the decoder's, when it is not the prepared folder's. `memory`:
    a retrieval decoder's retrieved captions of every prepared row (opts.retrieval off: none read); with
    `voters` (per row) and their datastore `store`, the captions are chosen as `caption` does (decoding.chosen),
    the photos `familiarity` calls unlike the training photos by consensus."""
    was_training = decoder.training
    decoder.eval()
    words = concepts.vocab if concepts is not None and opts.concepts else vocab or prepared.vocab
    out = {}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        if encoder is None:
            feats = torch.from_numpy(prepared.features[chunk].astype(np.float32)).to(device)
        else:
            encoder.eval()
            feats = encoder.regions(image_inputs(encoder, prepared, device)(np.asarray(chunk)))
        search = cast(Decoder, decoder)
        if memory is not None and opts.retrieval:  # a retrieval decoder: reading() gives it for these photos
            search = cast(Any, decoder).reading(torch.from_numpy(memory[chunk]))
        if concepts is not None and opts.concepts:
            search = concepts.decoder(search, opts.concept_threshold)
        voting = voters is not None and store is not None and opts.retrieval
        unfamiliar = unfamiliar_photos(familiarity if voting else None, feats, opts.unfamiliar_threshold)
        results = beam_search(search, feats, search_options(opts, voting=bool(unfamiliar.any())))
        if voting:
            assert voters is not None and store is not None
            probs = concepts.probs(feats).cpu().numpy() if concepts is not None else [None] * len(chunk)
            results = [chosen(captions, words, voters[row], store, p, opts, u)
                       for row, captions, p, u in zip(chunk, results, probs, unfamiliar)]
        for row, best in zip(chunk, results):
            out[prepared.records[row].name] = best[0].text or words.decode(best[0].tokens)
    decoder.train(was_training)
    return out


@torch.inference_mode()
def retrieved_memory(prepared: Prepared, embedder: ImageEmbedder, datastore: Datastore, decoder: RetrievalLSTM,
                     vocab: Vocab, k: int | None = None, leave_out: bool = False, batch_size: int = 256,
                     concepts: Concepts | None = None, concept_weight: float = 0.0,
                     rows: list[int] | None = None, voters: int = 0, familiarity: Familiarity | None = None,
                     unfamiliar_threshold: float = 1.0,
                     log: Callable[[str], None] = print) -> tuple[np.ndarray, dict[int, list[str]]]:
    """The k retrieved captions of the prepared photos `rows` (default: all) as a retrieval decoder's memory rows
    (prepared rows, M; zeros elsewhere), from its cached features, and the texts of the first max(k, voters)
    per row (consensus.py's voters); `leave_out`: never the photo's own captions (training); with `concepts`,
    ranked again by the concept words they name as `caption` does (models/retrieval.retrieve); the photos
    `familiarity` gives more than `unfamiliar_threshold` of being unlike the training photos take their vectors from
    the embedder's library head, where it has one (models/embedder.py)."""
    from .models.retrieval import retrieve

    own = datastore.groups_by_image() if leave_out else {}
    memory = np.zeros((len(prepared.records), decoder.memory_size), dtype=np.int64)
    if rows is None:  # every photo with features
        rows = [i for i in range(len(prepared.records)) if prepared.status[i] == DONE]
    excluded = 0
    texts: dict[int, list[str]] = {}
    for start in tqdm(range(0, len(rows), batch_size), desc="retrieving", unit="batch", leave=False):
        chunk = rows[start:start + batch_size]
        features = torch.from_numpy(prepared.features[chunk].astype(np.float32))
        vectors = embedder(features, unfamiliar_photos(familiarity, features, unfamiliar_threshold)).numpy()
        probs = concepts.probs(features).numpy() if concepts is not None else None
        exclude = [own.get(prepared.records[i].name) for i in chunk]
        excluded += sum(e is not None for e in exclude)
        found_memory, found = retrieve(datastore, vectors, vocab, decoder.args, k, exclude, probs,
                                       concept_table().vocabulary, concept_weight, voters)
        memory[chunk] = found_memory.numpy()
        texts.update(zip(chunk, found.texts))
    log(f"retrieved {k or decoder.args.neighbours} captions for {len(rows)} photos from {datastore.name}"
        + (f" ({excluded} photos' own captions left out)" if leave_out else ""))
    return memory, texts


def evaluate_model(model: str | Path, prepared_dir: str | Path, split: str = "test",
                   beam_sizes: Sequence[int] | None = None, device: str = "auto", out_dir: str | Path | None = None,
                   log: Callable[[str], None] = print, ensemble: Sequence[str | Path] = (),
                   datastore: str | Path | None = None, **overrides: Any) -> list[tuple[str, dict[str, float]]]:
    """Score `model` on `split` at each beam size (default: the model's own), decoding as `caption` and
    `serve` do: with the model's decoding options (maximum length, length penalty, trigram blocking),
    `overrides` of the same names on top (None: the model's). A model whose fine-tuned encoder did
    not make the cached features (`prepare --encoder-from`) re-encodes the images. `ensemble` names
    more models on the same features whose word probabilities are averaged with the model's
    (decoding.Ensemble); its decoding options apply. A retrieval model reads `datastore` (default: its own)."""
    dev = resolve_device(device)
    prepared = open_prepared(prepared_dir)
    loaded = load_model(model, dev)
    base = dataclasses.replace(DecodingOptions(**loaded.decoding),
                               **{k: v for k, v in overrides.items() if v is not None})
    members = [(model, loaded)] + [(path, load_model(path, dev)) for path in ensemble]
    for path, member in members[1:]:  # the features must fit (below); the vocabulary is the model's own
        if member.vocab.itos != loaded.vocab.itos:
            raise ValueError(f"{path} was trained with another vocabulary than {model}: no ensemble")
    encoder = None
    head = loaded.imagenet_head()
    concepts = Concepts(*head, loaded.vocab) if head is not None else None
    specs = [member.features_spec for _, member in members]  # a fine-tuned encoder's is a digest: once each
    if len(members) == 1 and loaded.encoder_state is not None and specs[0] != prepared.spec:
        encoder = loaded.encoder(dev).for_inference()  # fine-tuned after these features were cached: re-encode
    else:
        for (path, _), spec in zip(members, specs):
            check_encoder_spec(spec, prepared.spec, f"{path} (against {prepared_dir})")
    decoder: nn.Module = Ensemble([member.decoder for _, member in members]) if ensemble else loaded.decoder
    rows = split_rows(prepared, split)
    refs = prepared.references(rows)
    memory, voters, store = None, None, None
    if getattr(loaded.decoder, "reads_memory", False) and base.retrieval:
        if loaded.embedder is None:
            raise ValueError(f"{model} reads retrieved captions but has no image embedder (retrieval.safetensors)")
        reader = cast("RetrievalLSTM", loaded.decoder)
        store = model_datastore(loaded.path, loaded.embedder, datastore)
        memory, voters = retrieved_memory(prepared, loaded.embedder, store, reader, loaded.vocab, base.retrieved,
                                          concepts=concepts, concept_weight=base.retrieval_concepts, rows=rows,
                                          voters=voters_needed(base, loaded.familiarity is not None),
                                          familiarity=loaded.familiarity,
                                          unfamiliar_threshold=base.unfamiliar_threshold, log=log)
    # beside the model, not in it: a training run swaps best/ as a whole, which would drop the results
    out = Path(out_dir) if out_dir else Path(model).with_name(f"{Path(model).name}-eval_{split}")
    out.mkdir(parents=True, exist_ok=True)
    table = []
    fluent = [("references (the first of each image)", fluency([" ".join(tokenize(c[0])) for c in refs.values()]))]
    for k in beam_sizes or [base.beam_size]:
        opts = dataclasses.replace(base, beam_size=k)
        start = time.time()
        predictions = decode_split(decoder, prepared, rows, opts, dev, encoder, concepts=concepts,
                                   vocab=loaded.vocab, memory=memory, voters=voters, store=store,
                                   familiarity=loaded.familiarity)
        seconds = time.time() - start
        scores = score_captions(predictions, refs)
        _write_json(out / f"captions_beam{k}.json", predictions, indent=0)
        table.append((f"beam {k}", scores))
        fluent.append((f"beam {k}", fluency(list(predictions.values()))))
        log(f"beam {k}: BLEU-4 {100 * scores['Bleu_4']:.1f} CIDEr {100 * scores['CIDEr']:.1f} "
            f"({len(rows)} images decoded in {seconds:.1f}s)")
    decoding = {key: value for key, value in vars(base).items() if key not in ("beam_size", "num_captions")}
    results = {"model": str(model), **({"ensemble": [str(p) for p in ensemble]} if ensemble else {}),
               "split": split, "images": len(rows), "max_length": base.max_length, "decoding": decoding,
               "scores": {name: s for name, s in table}, "fluency": {name: f for name, f in fluent}}
    _write_json(out / "results.json", results, indent=1)
    log(format_fluency_table(fluent))
    written = [f"captions_beam{k}.json" for k in beam_sizes or [base.beam_size]] + ["results.json"]
    log(f"outputs in {out}: {', '.join(written)}")
    return table


def split_rows(prepared: Prepared, split: str) -> list[int]:
    """The rows of `split`, or an error that says the split is empty and how to get one."""
    rows = prepared.indices(split)
    if not rows:
        raise ValueError(f"{prepared.root}: the {split} split has no images, so there are no captions to measure; "
                         f"prepare the data again with a {split} split (a Karpathy split file, --split-file, or "
                         "annotations that name no splits: prepare then holds out 5% each for val and test), "
                         f"or score another split (--split {'test' if split == 'val' else 'val'})")
    return rows


def _write_json(path: Path, data: object, indent: int) -> None:
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent) + "\n"))


def evaluate_nearest_neighbour(prepared_dir: str | Path, split: str = "test", k: int = 25) -> dict[str, float]:
    """Retrieval baseline: captions of the most similar training images, chosen by consensus."""
    prepared = open_prepared(prepared_dir)
    train_rows, rows = prepared.indices("train"), split_rows(prepared, split)

    def pooled(r: list[int]) -> np.ndarray:
        return np.stack([prepared.features[i].astype(np.float32).mean(axis=0) for i in r])

    chosen = nearest_neighbour_captions(pooled(train_rows), [list(prepared.records[i].captions) for i in train_rows],
                                        pooled(rows), k=k)
    predictions = {prepared.records[r].name: c for r, c in zip(rows, chosen)}
    return score_captions(predictions, prepared.references(rows))

