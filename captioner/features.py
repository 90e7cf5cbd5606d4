"""`captioner prepare`: a dataset becomes a folder ready to train on.

The folder holds the records (image, captions, split), the vocabulary built on the train split, and the
frozen encoder's feature maps for every image in one float16 memory-mapped array. Extraction goes in
fixed batches and records its progress after each one, so a killed run resumes where it stopped and
ends byte-identical to an uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .atomic import replace_file
from .config import Config
from .data import ImageError, Record, load_dataset, load_image
from .encoders import Encoder, create_encoder
from .runtime import resolve_device
from .vocab import Vocab, tokenize

PENDING, DONE, FAILED = 0, 1, 2  # an image's state in status.npy
ENCODER_FILE = "encoder.safetensors"  # a fine-tuned encoder's weights, beside the features it made


@dataclass
class Prepared:
    """An opened prepared folder: what training and evaluation read."""

    root: Path
    records: list[Record]
    vocab: Vocab
    spec: dict
    features: np.ndarray  # (N, H*W, C) float16 memmap, row i belongs to records[i]
    status: np.ndarray  # (N,) PENDING / DONE / FAILED

    def indices(self, split: str) -> list[int]:
        """Rows of `split` whose features were extracted."""
        return [i for i, r in enumerate(self.records) if r.split == split and self.status[i] == DONE]

    def pooled(self, rows: list[int]) -> torch.Tensor:
        """(N, C) float32 mean regions of `rows`, read row by row: what the familiarity check (familiarity.py)
        and the ImageNet head read of a photo."""
        return torch.from_numpy(np.stack([self.features[i].astype(np.float32).mean(0) for i in rows]))

    def references(self, rows: list[int]) -> dict[str, list[str]]:
        """{image name: all its reference captions}, the form coco-caption scores against."""
        return {self.records[r].name: list(self.records[r].captions) for r in rows}

    def encoder_state(self) -> dict[str, torch.Tensor] | None:
        """The fine-tuned encoder weights the features were extracted with (`prepare --encoder-from`),
        which every model trained on them must carry; None for a pretrained encoder's features."""
        from safetensors.torch import load_file

        from .models import TUNED, tuned_weights

        if not self.spec["weights"].startswith(TUNED):
            return None
        path = self.root / ENCODER_FILE
        if not path.exists():
            raise FileNotFoundError(f"{self.root}: its features come from a fine-tuned encoder, whose weights "
                                    f"({ENCODER_FILE}) are missing; run `captioner prepare --encoder-from MODEL` again")
        state = load_file(str(path))
        if (found := tuned_weights(state)) != self.spec["weights"]:
            raise ValueError(f"{path} is not the encoder the features in {self.root} were extracted with "
                             f"({found}, not {self.spec['weights']}); run prepare again")
        return state


def _write_json(path: Path, data: object) -> None:
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


def _save_status(path: Path, status: np.ndarray) -> None:
    replace_file(path, lambda tmp: tmp.write_bytes(_npy_bytes(status)))


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def first_images(records: list[Record], n: int) -> list[Record]:
    """The first n images (in the annotations' order) in a fixed proportion, for a quick first run: n // 10
    (at least 1 from n = 3 on) each from val and test, the rest from train; a split with fewer images gives
    all it has. 0 keeps everything."""
    if not n:
        return records
    held = max(1, n // 10) if n >= 3 else 0
    quota = {"train": n - 2 * held, "val": held, "test": held}
    kept = []
    for r in records:
        if quota.get(r.split, 0) > 0:
            quota[r.split] -= 1
            kept.append(r)
    return kept


def feature_bytes(images: int, positions: int, channels: int) -> int:
    """Size of the float16 feature cache: N x positions x channels x 2 bytes."""
    return images * positions * channels * 2


def check_disk(root: Path, needed: int, shape: tuple[int, ...], log: Callable[[str], None]) -> None:
    """Say what the feature cache will take before extraction, and refuse when the disk lacks it (COCO at
    7x7x1280 is about 15 GB): a full disk found an hour into extraction costs that hour. `needed` is what is
    still to be allocated (a resumed cache is already partly there)."""
    total = feature_bytes(*shape)
    log(f"feature cache: {shape[0]} images x {shape[1]} positions x {shape[2]} channels x 2 bytes = "
        f"{_size(total)} in {root}")
    free = shutil.disk_usage(root).free
    if needed > free:
        raise OSError(f"{root}: the feature cache needs {needed} bytes ({_size(needed)}) more, but only {free} bytes "
                      f"({_size(free)}) are free there; free some space or pick another --prepared folder")


def _size(n: float) -> str:
    """Bytes in decimal units, as disks are sold and `df -H` shows them."""
    for unit in ("bytes", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def assign_splits(records: list[Record]) -> list[Record]:
    """Give records without a split a stable one from a hash of the name: 90% train, 5% val, 5% test."""
    out = []
    for r in records:
        if not r.split:
            bucket = int(hashlib.sha1(r.name.encode()).hexdigest(), 16) % 20
            r = dataclasses.replace(r, split="test" if bucket == 0 else "val" if bucket == 1 else "train")
        out.append(r)
    return out


def _records_to_json(records: list[Record]) -> list[dict]:
    return [{"name": r.name, "image": str(r.image), "root": str(r.root) if r.root else None,
             "captions": list(r.captions), "split": r.split} for r in records]


def _records_from_json(items: list[dict]) -> list[Record]:
    return [Record(image=Path(d["image"]), captions=tuple(d["captions"]), split=d["split"],
                   root=Path(d["root"]) if d["root"] else None) for d in items]


def open_prepared(path: str | Path) -> Prepared:
    root = Path(path)
    meta_path = root / "features.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{root} is not a prepared folder (no features.json); run `captioner prepare` first")
    meta = json.loads(meta_path.read_text())
    records = _records_from_json(json.loads((root / "records.json").read_text()))
    features = np.memmap(root / "features.f16", dtype=np.float16, mode="r", shape=tuple(meta["shape"]))
    status = np.load(root / "status.npy")
    return Prepared(root, records, Vocab.load(root / "vocab.json"), meta["spec"], features, status)


def _load_batch(encoder: Encoder, records: list[Record]) -> tuple[torch.Tensor, list[int], list[str]]:
    """Preprocess a batch; unreadable images become (index, reason) instead of ending the run."""
    tensors, ok, errors = [], [], []
    for i, r in enumerate(records):
        try:
            tensors.append(encoder.preprocess(load_image(r.image)))
            ok.append(i)
        except ImageError as err:
            errors.append(str(err))
    batch = torch.stack(tensors) if tensors else torch.empty(0)
    return batch, ok, errors


def extract(records: list[Record], encoder: Encoder, root: Path, batch_size: int,
            device: torch.device, log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """Fill root/features.f16 for `records`, resuming from root/status.npy."""
    h, w = encoder.grid()
    shape = (len(records), h * w, encoder.channels)
    meta: dict[str, Any] = {"spec": encoder.spec(), "shape": list(shape), "batch_size": batch_size}
    meta_path, feat_path, status_path = root / "features.json", root / "features.f16", root / "status.npy"
    have = feat_path.stat().st_size if feat_path.exists() else 0
    check_disk(root, max(0, feature_bytes(*shape) - have), shape, log)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old["spec"] != meta["spec"]:
            raise ValueError(
                f"{root} holds features from {_describe(old['spec'])}, not {_describe(meta['spec'])}; "
                "use another --prepared folder or delete this one")
        if old["shape"] != meta["shape"]:  # prepare() has already refused other records
            raise ValueError(f"{root} holds features of another shape; use another --prepared folder")
        batch_size = old["batch_size"]  # the same batch boundaries give bit-identical features on resume
        status = np.load(status_path)
        _recover_short_file(feat_path, status, shape, status_path, log)
        features = np.memmap(feat_path, dtype=np.float16, mode="r+", shape=shape)
    else:
        _allocate(feat_path, int(np.prod(shape)) * 2)
        features = np.memmap(feat_path, dtype=np.float16, mode="r+", shape=shape)
        status = np.zeros(len(records), dtype=np.uint8)
        _save_status(status_path, status)
        _write_json(meta_path, meta)

    batches = [range(s, min(s + batch_size, len(records))) for s in range(0, len(records), batch_size)]
    todo = [b for b in batches if (status[b.start:b.stop] == PENDING).any()]
    if len(todo) < len(batches):
        log(f"resuming: {len(batches) - len(todo)} of {len(batches)} batches already done")
    encoder.to(device).eval()
    done = sum(len(b) for b in batches) - sum(len(b) for b in todo)
    with ThreadPoolExecutor(max_workers=1) as pool, tqdm(total=len(records), initial=done, unit="img", desc="features",
                                                        mininterval=0.1 if sys.stderr.isatty() else 60) as bar:
        pending = pool.submit(_load_batch, encoder, [records[i] for i in todo[0]]) if todo else None
        for k, rows in enumerate(todo):
            assert pending is not None  # submitted above for the first batch, below for the next
            batch, ok, errors = pending.result()
            if k + 1 < len(todo):  # decode the next batch while this one runs through the network
                pending = pool.submit(_load_batch, encoder, [records[i] for i in todo[k + 1]])
            for msg in errors:
                tqdm.write(f"skipped: {msg}", file=sys.stderr)
            block = np.zeros((len(rows), h * w, encoder.channels), dtype=np.float16)
            if ok:
                with torch.inference_mode():
                    regions = encoder.regions(batch.to(device)).float()
                block[ok] = regions.cpu().numpy().astype(np.float16)
            features[rows.start:rows.stop] = block
            features.flush()
            status[rows.start:rows.stop] = FAILED
            status[[rows.start + i for i in ok]] = DONE
            _save_status(status_path, status)
            bar.update(len(rows))
    return features, status


def _recover_short_file(feat_path: Path, status: np.ndarray, shape: tuple[int, ...], status_path: Path,
                        log: Callable[[str], None]) -> None:
    """A feature file shorter than its shape (cut by a kill, a full disk or a copy): the rows it lost go
    back to PENDING, and the file is brought back to full length so they can be encoded again."""
    row_bytes = int(np.prod(shape[1:])) * 2
    size = feat_path.stat().st_size if feat_path.exists() else 0
    if size >= shape[0] * row_bytes:
        return
    whole = size // row_bytes
    lost = int((status[whole:] != PENDING).sum())
    if lost:
        log(f"{feat_path} is cut short ({size} of {shape[0] * row_bytes} bytes): encoding {lost} image(s) again")
    status[whole:] = PENDING
    _save_status(status_path, status)
    _allocate(feat_path, shape[0] * row_bytes)


def _allocate(path: Path, size: int) -> None:
    """The feature file at full size, its blocks reserved where the OS can: a disk too small then fails
    here with ENOSPC, not with a SIGBUS in the middle of extraction (writes into a memory map have no
    other way to report a full disk)."""
    with open(path, "ab") as f:
        f.truncate(size)
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(f.fileno(), 0, size)


def _describe(spec: dict) -> str:
    return f"{spec['encoder']} at {spec['image_size']}px (layer {spec['layer']}, weights {spec['weights']})"


def _encoder_to_prepare(cfg: Config) -> tuple[Encoder, dict[str, torch.Tensor] | None]:
    """The pretrained encoder the config names, or the fine-tuned one of `cfg.encoder_from` with its
    weights (which then travel into every model trained on these features)."""
    if not cfg.encoder_from:
        return create_encoder(cfg.encoder, pretrained=True, image_size=cfg.image_size, layer=cfg.feature_layer), None
    from .models import load_model

    model = load_model(cfg.encoder_from)
    if model.encoder_state is None:
        raise ValueError(f"encoder_from {cfg.encoder_from} has no fine-tuned encoder (its decoder was trained on "
                         "cached features); leave encoder_from empty for the pretrained encoder's features")
    spec = model.encoder_spec
    asked: dict[str, str | int] = {"encoder": cfg.encoder, "layer": cfg.feature_layer}
    if cfg.image_size:  # 0: whatever the model was trained at
        asked["image_size"] = cfg.image_size
    differ = [f"{k} {v!r} (config) != {spec[k]!r} (model)" for k, v in asked.items() if spec[k] != v]
    if differ:
        raise ValueError(f"encoder_from {cfg.encoder_from} has another encoder than the config: {'; '.join(differ)}")
    return model.encoder(), model.encoder_state


def held_out(records: list[Record], words: str, log: Callable[[str], None]) -> list[Record]:
    """Records without the train images whose captions mention any of `words` (comma-separated, matched
    as whole tokens), as the novel-object protocol asks: the model must never see those words."""
    banned = {w.strip().lower() for w in words.split(",") if w.strip()}
    if not banned:
        return records
    kept = [r for r in records if r.split != "train" or not any(banned & set(tokenize(c)) for c in r.captions)]
    log(f"held out {len(records) - len(kept)} train images mentioning {', '.join(sorted(banned))}")
    return kept


def prepare(cfg: Config, log: Callable[[str], None] = print) -> Prepared:
    """Read the dataset, build the vocabulary and cache the frozen encoder's features."""
    dataset = load_dataset(cfg.data, format=cfg.format, images=cfg.images or None, skip_missing=cfg.skip_missing,
                           split_file=cfg.split_file or None)
    for problem in dataset.problems:
        log(f"note: {problem}")
    if dataset.missing:
        log(f"skipped {len(dataset.missing)} records whose image is missing (--skip-missing)")
    if dataset.splits:
        log(f"splits: {dataset.splits}")
    records = held_out(assign_splits(dataset.records), cfg.holdout_words, log)
    if cfg.max_images:
        records = first_images(records, cfg.max_images)
        log(f"max_images {cfg.max_images}: kept the first {len(records)} images")
    root = Path(cfg.prepared)
    root.mkdir(parents=True, exist_ok=True)
    train_captions = [c for r in records if r.split == "train" for c in r.captions]
    if not train_captions:
        raise ValueError(f"{cfg.data}: no training captions, so no vocabulary can be built")
    vocab = Vocab.build(train_captions, min_count=cfg.min_count, max_length=cfg.max_caption_length)
    if cfg.extra_vocabulary:
        vocab = extended_vocabulary(vocab, cfg.extra_vocabulary.split(","), cfg.extra_min_count, log)
    records_path = root / "records.json"
    if records_path.exists() and json.loads(records_path.read_text()) != _records_to_json(records):
        raise ValueError(f"{root} was prepared from other data; use another --prepared folder or delete it")
    _write_json(records_path, _records_to_json(records))
    replace_file(root / "vocab.json", vocab.save)

    encoder, state = _encoder_to_prepare(cfg)
    encoder = encoder.for_inference()
    device = resolve_device(cfg.device)
    features, status = extract(records, encoder, root, cfg.prepare_batch_size, device, log)
    if state is not None:  # after extract(), which refuses a folder holding other features
        from safetensors.torch import save

        replace_file(root / ENCODER_FILE, lambda tmp: tmp.write_bytes(save(state)))
    failed = [records[i].name for i in np.flatnonzero(status == FAILED)]
    counts = {s: sum(1 for r in records if r.split == s) for s in ("train", "val", "test")}
    log(f"{dataset.format} dataset: {len(records)} images "
        f"(train {counts['train']}, val {counts['val']}, test {counts['test']}), "
        f"{sum(len(r.captions) for r in records)} captions")
    log(f"vocabulary: {len(vocab)} words (min count {cfg.min_count} on train)")
    log(f"features: {features.shape[0]} x {features.shape[1]} positions x {features.shape[2]} channels, "
        f"float16, {features.nbytes / 2**20:.1f} MiB, {_describe(encoder.spec())}")
    if failed:
        log(f"{len(failed)} unreadable image(s) left out: {', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}")
    log(f"ready: {root}")
    return open_prepared(root)


def extended_vocabulary(vocab: Vocab, sources: list[str], min_count: int, log: Callable[[str], None]) -> Vocab:
    """`vocab` followed by the words of the caption files seen min_count times and every concept word it
    lacks: words a retrieval decoder can copy from retrieved captions though its training captions never
    taught it to write them."""
    from .concepts import concept_table
    from .datastore import caption_groups

    captions, _, _ = caption_groups([s.strip() for s in sources if s.strip()], log=log)
    more = Vocab.build(captions, min_count=min_count).itos[4:] + list(concept_table().vocabulary)
    known = set(vocab.itos)
    added = list(dict.fromkeys(w for w in more if w not in known))
    log(f"vocabulary: {len(added)} words added from {', '.join(sources)} and the concept table")
    return Vocab(vocab.itos[4:] + added, min_count=vocab.min_count, max_length=vocab.max_length)


def image_inputs(encoder: Encoder, prepared: Prepared, device: torch.device) -> Callable[[np.ndarray], torch.Tensor]:
    """Feature rows -> the batch of their images as the encoder takes it: what stage 2 and a fine-tuned
    encoder's evaluation read instead of the cached features."""

    def inputs(rows: np.ndarray) -> torch.Tensor:
        return torch.stack([encoder.preprocess(load_image(prepared.records[r].image)) for r in rows]).to(device)

    return inputs
