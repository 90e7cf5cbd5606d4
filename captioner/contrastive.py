"""Contrastive pretraining of a decoder's image side (`pretrain: contrastive`) and the retrieval it gives.

Every image has about five captions. Before caption training, the decoder family's `image_side()` (the
projection of the encoder's feature map) and a pooled head (mean over regions, a linear map to the
sentence-embedding width, L2-normalised) learn to place an image near the sentence embeddings of its
own captions and far from the other captions of the batch (InfoNCE, both directions, learned
temperature). The sentence embeddings come from a frozen MiniLM encoder, computed once and cached in
the prepared folder. Caption training then starts from the pretrained image side; the pooled head
stays in the run's `pretrain.pt`, where `captioner retrieve` finds it; `captioner add-retrieval-head`
copies image side and head into a model folder, for search (models/embedder.py).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from .atomic import replace_file
from .config import Config
from .features import Prepared, open_prepared
from .models import CaptionDecoder, build_decoder, check_encoder_spec, load_model
from .models.embedder import ImageEmbedder, PooledHead
from .models.files import add_retrieval
from .runtime import bf16_supported, is_main, load_checkpoint, make_optimizer, resolve_device, save_checkpoint
from .sentences import SENTENCE_MODEL, load_sentence_encoder

CACHE = "sentences-minilm"  # PREPARED/sentences-minilm.npy (float16) + .json (model, caption count, digest)
MAX_LOG_SCALE = math.log(100.0)  # logits scale 1/T at most 100 (T >= 0.01), as CLIP clamps it
PRETRAIN_FILE = "pretrain.pt"
# The options a finished pretraining depends on: a run may reuse its pretrain.pt only if they are unchanged.
PRETRAIN_KEYS = ("pretrain", "pretrain_epochs", "pretrain_lr", "pretrain_batch_size", "optimizer", "weight_decay",
                 "seed", "decoder")


# ---------------------------------------------------------------- sentence embeddings

def caption_offsets(prepared: Prepared) -> np.ndarray:
    """(N + 1,) bounds: record i's captions are rows offsets[i]:offsets[i + 1] of the sentence table."""
    return np.cumsum([0] + [len(r.captions) for r in prepared.records])


def sentence_embeddings(prepared: Prepared, model: str = SENTENCE_MODEL, device: str | torch.device = "cpu",
                        batch_size: int = 256, log: Callable[[str], None] = print) -> np.ndarray:
    """(captions, D) float16 embeddings of every caption of every record, in record order, read from
    PREPARED/sentences-minilm.npy or computed (in batches, with a progress bar) and written there.

    A cache made by another model or for other captions is refused, not silently reused."""
    texts = [c for r in prepared.records for c in r.captions]
    want = {"model": model, "captions": len(texts), "sha1": hashlib.sha1("\n".join(texts).encode()).hexdigest()}
    table_path, meta_path = prepared.root / f"{CACHE}.npy", prepared.root / f"{CACHE}.json"
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        stale = [f"{key} {meta.get(key)!r} (cache) != {value!r}"
                 for key, value in want.items() if meta.get(key) != value]
        if stale:
            raise ValueError(f"{meta_path} is stale: {'; '.join(stale)}; delete {table_path.name} and "
                             f"{meta_path.name} to recompute")
        table = np.load(table_path)
        if table.shape[0] != len(texts):
            raise ValueError(f"{table_path} holds {table.shape[0]} rows, not {len(texts)}; delete it to recompute")
        return table
    encoder = load_sentence_encoder(model, resolve_device(str(device)))
    chunks = [encoder(texts[s:s + batch_size]).astype(np.float16)
              for s in tqdm(range(0, len(texts), batch_size), desc="sentence embeddings", unit="batch",
                            mininterval=0.1 if sys.stderr.isatty() else 60)]
    if not chunks:
        raise ValueError(f"{prepared.root}: no captions to embed")
    table = np.concatenate(chunks)
    def write_table(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add .npy to the name
            np.save(f, table)

    replace_file(table_path, write_table)
    meta = json.dumps({**want, "dim": int(table.shape[1])}, indent=1) + "\n"
    replace_file(meta_path, lambda tmp: tmp.write_text(meta))  # written last: a cache without its json is never read
    log(f"sentence embeddings: {table.shape[0]} captions x {table.shape[1]} ({model}) -> {table_path}")
    return table


# ---------------------------------------------------------------- the head, the loss, retrieval

def info_nce(images: Tensor, texts: Tensor, owner: Tensor, log_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over a batch of I images (I, D) and their T captions (T, D), both L2-normalised;
    owner (T,) names each caption's image. Caption -> image: each caption's one positive is its image,
    among the batch's images. Image -> caption: all of an image's captions are positives; its loss is
    the mean over them of -log softmax over all T captions of the batch (the multi-positive form of
    supervised contrastive learning), so every caption pulls and none is sampled away. The two
    directions count equally."""
    logits = log_scale.clamp(0.0, MAX_LOG_SCALE).exp() * images.float() @ texts.float().T  # (I, T)
    positive = owner.unsqueeze(0) == torch.arange(len(images), device=owner.device).unsqueeze(1)
    caption_to_image = F.cross_entropy(logits.T, owner)
    logp = logits.log_softmax(dim=1)
    image_to_caption = -(logp * positive).sum(dim=1) / positive.sum(dim=1).clamp(min=1)
    return (image_to_caption.mean() + caption_to_image) / 2


def retrieval_recall(images: Tensor, texts: Tensor, owner: Tensor,
                     ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways from cosine similarity. Image -> caption: a hit when any of the image's own
    captions is among its k nearest captions; caption -> image: when its image is among the caption's
    k nearest images. Ties count against the hit, so constant embeddings score no better than chance."""
    sim = images.float() @ texts.float().T  # (I, T)
    positive = owner.unsqueeze(0) == torch.arange(len(images), device=owner.device).unsqueeze(1)
    best_own = sim.masked_fill(~positive, -math.inf).max(dim=1, keepdim=True).values
    image_rank = (sim.masked_fill(positive, -math.inf) >= best_own).sum(dim=1)  # others' captions ahead
    own = sim[owner, torch.arange(len(owner), device=owner.device)]
    caption_rank = (sim >= own.unsqueeze(0)).sum(dim=0) - 1  # other images at least as near
    out = {f"i2t_r{k}": int((image_rank < k).sum()) / len(images) for k in ks}
    out.update({f"t2i_r{k}": int((caption_rank < k).sum()) / len(owner) for k in ks})
    return out


def format_recall(scores: dict[str, float], ks: tuple[int, ...] = (1, 5, 10)) -> str:
    """Markdown table of recall@k in percent, one row per direction."""
    lines = ["| direction | " + " | ".join(f"R@{k}" for k in ks) + " |", "|---|" + "---:|" * len(ks)]
    for key, name in (("i2t", "image -> caption"), ("t2i", "caption -> image")):
        lines.append(f"| {name} | " + " | ".join(f"{100 * scores[f'{key}_r{k}']:.1f}" for k in ks) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- data

def split_captions(prepared: Prepared, rows: list[int]) -> tuple[list[np.ndarray], np.ndarray]:
    """For each row its caption rows in the sentence table, and all of them with their owner (0..len(rows)-1)."""
    offsets = caption_offsets(prepared)
    captions = [np.arange(offsets[r], offsets[r + 1]) for r in rows]
    owner = np.concatenate([np.full(len(c), k) for k, c in enumerate(captions)]) if rows else np.zeros(0, int)
    return captions, owner


@torch.inference_mode()
def embed_images(image_side: nn.Module, head: PooledHead, prepared: Prepared, rows: list[int],
                 device: torch.device, batch_size: int = 500) -> Tensor:
    """(len(rows), D) image embeddings from the cached features."""
    image_side.eval()
    head.eval()
    out = [head(image_side(torch.from_numpy(prepared.features[rows[s:s + batch_size]].astype(np.float32)).to(device)))
           for s in range(0, len(rows), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, head.proj.out_features, device=device)


def split_recall(image_side: nn.Module, head: PooledHead, prepared: Prepared, sentences: Tensor, split: str,
                 device: torch.device) -> dict[str, float]:
    """Retrieval recall among one split's images and their captions."""
    rows = prepared.indices(split)
    if not rows:
        raise ValueError(f"{prepared.root}: the {split} split has no images with features")
    captions, owner = split_captions(prepared, rows)
    images = embed_images(image_side, head, prepared, rows, device)
    return retrieval_recall(images, sentences[np.concatenate(captions)].to(device), torch.from_numpy(owner).to(device))


# ---------------------------------------------------------------- the loop

def pretrain(cfg: Config, image_side: nn.Module, region_dim: int, prepared: Prepared, sentences: Tensor,
             device: torch.device, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train `image_side` (in place) and a new pooled head for cfg.pretrain_epochs on the train split,
    Adam(W) at pretrain_lr on a cosine schedule, batches of pretrain_batch_size images with all their
    captions. Keeps the epoch with the best dev recall (the sum of R@1/5/10 both ways) when there is
    a dev split. Returns the weights, the head and the per-epoch history."""
    rows = prepared.indices("train")
    if not rows:
        raise ValueError(f"{prepared.root}: the train split has no images with features")
    validate = bool(prepared.indices("val"))
    captions, _ = split_captions(prepared, rows)
    head = PooledHead(region_dim, sentences.shape[1]).to(device)
    optimizer = make_optimizer(cfg.optimizer, list(image_side.parameters()) + list(head.parameters()), cfg.pretrain_lr,
                               cfg.weight_decay)
    steps_per_epoch = math.ceil(len(rows) / cfg.pretrain_batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer,
                                                          T_max=max(1, steps_per_epoch * cfg.pretrain_epochs))
    use_amp = cfg.amp and bf16_supported(device)
    rng = np.random.default_rng(cfg.seed)
    sentences = sentences.to(device)
    history: list[dict] = []
    best: tuple[float, int, dict, dict] = (-math.inf, 0, copy.deepcopy(image_side.state_dict()),
                                           copy.deepcopy(head.state_dict()))
    for epoch in range(1, cfg.pretrain_epochs + 1):
        image_side.train()
        head.train()
        order = rng.permutation(len(rows))
        start, total, count = time.time(), 0.0, 0
        bar = tqdm(range(0, len(order), cfg.pretrain_batch_size), desc=f"pretrain {epoch}/{cfg.pretrain_epochs}",
                   unit="batch", leave=False, mininterval=0.1 if sys.stderr.isatty() else 60)
        for s in bar:
            batch = np.sort(order[s:s + cfg.pretrain_batch_size])  # sorted rows read the memmap in order
            feats = torch.from_numpy(prepared.features[[rows[i] for i in batch]].astype(np.float32)).to(device)
            caps = np.concatenate([captions[i] for i in batch])
            owner = torch.from_numpy(np.concatenate([np.full(len(captions[i]), k) for k, i in enumerate(batch)]))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                images = head(image_side(feats))
            loss = info_nce(images, sentences[caps], owner.to(device), head.log_scale)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
            bar.set_postfix(loss=f"{total / count:.3f}", refresh=False)
        row: dict[str, Any] = {"epoch": epoch, "loss": total / count,
                               "temperature": float(1 / head.log_scale.detach().clamp(0, MAX_LOG_SCALE).exp()),
                               "seconds": round(time.time() - start, 1)}
        if validate:
            recall = split_recall(image_side, head, prepared, sentences, "val", device)
            row.update({f"val_{k}": v for k, v in recall.items()})
        history.append(row)
        score = sum(v for k, v in row.items() if k.startswith("val_")) if validate else epoch
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(image_side.state_dict()), copy.deepcopy(head.state_dict()))
        shown = (f" dev R@1 image->caption {100 * row['val_i2t_r1']:.1f} caption->image {100 * row['val_t2i_r1']:.1f}"
                 if validate else "")
        log(f"pretrain epoch {epoch}: InfoNCE {row['loss']:.3f} temperature {row['temperature']:.3f}{shown} "
            f"[{row['seconds']:.0f}s]")
    _, best_epoch, side_state, head_state = best
    return {"image_side": side_state, "head": head_state, "best_epoch": best_epoch, "history": history}


def pretrain_settings(cfg: Config, decoder: CaptionDecoder) -> dict[str, Any]:
    return {**{key: getattr(cfg, key) for key in PRETRAIN_KEYS}, "decoder_args": decoder.arguments()}


def pretrain_image_side(cfg: Config, decoder: CaptionDecoder, prepared: Prepared, device: torch.device,
                        log: Callable[[str], None] = print) -> None:
    """`train`'s hook: give `decoder`'s image side this run's contrastively pretrained weights.

    RUN_DIR/pretrain.pt holds a finished pretraining, so a run restarted after it reuses it instead of
    pretraining again (a pretraining cut short starts over: it takes minutes). The pretraining runs on
    a copy of the image side, under its own seeded random state, so caption training afterwards sees
    the same random numbers whether it pretrained now or loaded pretrain.pt. Under DDP only rank 0
    pretrains; wrapping the decoder in DDP then copies its weights to the other ranks."""
    if cfg.pretrain == "none":
        return
    if cfg.pretrain != "contrastive":
        raise ValueError(f"pretrain must be none or contrastive, not {cfg.pretrain!r}")
    path = Path(cfg.run_dir) / PRETRAIN_FILE
    settings = pretrain_settings(cfg, decoder)
    if path.exists():
        result = load_checkpoint(path)
        changed = [f"{key} ({result['settings'].get(key)!r} -> {value!r})" for key, value in settings.items()
                   if result["settings"].get(key) != value]
        if changed:
            raise ValueError(f"{path} was pretrained with other options: {', '.join(changed)}; "
                             "delete it to pretrain again")
        log(f"contrastive pretraining: done earlier, image side from {path} (epoch {result['best_epoch']})")
    elif not is_main():
        return
    else:
        sentences = torch.from_numpy(sentence_embeddings(prepared, device=device, log=log).astype(np.float32))
        side = copy.deepcopy(decoder.image_side())
        log(f"contrastive pretraining: {cfg.pretrain_epochs} epochs, {len(prepared.indices('train'))} images, "
            f"batches of {cfg.pretrain_batch_size} images, sentence embeddings of {SENTENCE_MODEL}")
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(cfg.seed)
            result = pretrain(cfg, side, decoder.region_dim, prepared, sentences, device, log)
        result.update(settings=settings, sentence_model=SENTENCE_MODEL, encoder_spec=prepared.spec,
                      decoder={"family": decoder.family, "args": decoder.arguments()},
                      vocab_size=decoder.vocab_size, feature_dim=decoder.feature_dim, region_dim=decoder.region_dim)
        save_checkpoint(path, **result)
        log(f"contrastive pretraining: best dev recall at epoch {result['best_epoch']}; saved {path}")
    decoder.image_side().load_state_dict(result["image_side"])


# ---------------------------------------------------------------- `captioner retrieve`

def load_pretrained(path: str | Path, device: torch.device) -> tuple[nn.Module, PooledHead, dict[str, Any]]:
    """The image side and pooled head of a pretraining: a run folder or its pretrain.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / PRETRAIN_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no contrastive pretraining here (train with --pretrain contrastive)")
    result = load_checkpoint(path)
    decoder = build_decoder(result["decoder"]["family"], result["decoder"]["args"], result["vocab_size"],
                            result["feature_dim"], source=str(path))
    side = decoder.image_side()
    side.load_state_dict(result["image_side"])
    head = PooledHead(result["region_dim"], result["head"]["proj.weight"].shape[0])
    head.load_state_dict(result["head"])
    return side.to(device).eval(), head.to(device).eval(), result


def evaluate_retrieval(run: str | Path, prepared_dir: str | Path, split: str = "test", device: str = "auto",
                       log: Callable[[str], None] = print) -> dict[str, float]:
    """Image -> caption and caption -> image recall@1/5/10 on one split with a pretraining's embeddings."""
    dev = resolve_device(device)
    prepared = open_prepared(prepared_dir)
    side, head, result = load_pretrained(run, dev)
    check_encoder_spec(result["encoder_spec"], prepared.spec, f"{run} (against {prepared_dir})")
    sentences = torch.from_numpy(sentence_embeddings(prepared, result["sentence_model"], dev,
                                                     log=log).astype(np.float32))
    scores = split_recall(side, head, prepared, sentences, split, dev)
    rows = prepared.indices(split)
    log(f"{split}: {len(rows)} images, {sum(len(prepared.records[r].captions) for r in rows)} captions "
        f"(pretraining epoch {result['best_epoch']} of {run})")
    return scores


def pretrained_embedder(run: str | Path) -> tuple[ImageEmbedder, dict[str, Any]]:
    """A pretraining's image side and head as one ImageEmbedder (float32, CPU). An image side that is not
    Linear + ReLU (the transformer's) is refused: a model folder stores only that shape."""
    side, head, result = load_pretrained(run, torch.device("cpu"))
    state = side.state_dict()
    if set(state) != {"0.weight", "0.bias"} or not isinstance(side, nn.Sequential) or not isinstance(side[1], nn.ReLU):
        raise ValueError(f"{run}: its image side is {type(side).__name__}, not Linear + ReLU, the only one a model "
                         "folder ships")
    region_dim, feature_dim = state["0.weight"].shape
    embedder = ImageEmbedder(feature_dim, region_dim, head.proj.out_features)
    embedder.image_side.load_state_dict(state)
    embedder.head.load_state_dict(head.state_dict())
    return embedder.eval(), result


@torch.no_grad()
def add_retrieval_head(run: str | Path, model: str | Path, prepared_dir: str | Path | None = None,
                       log: Callable[[str], None] = print) -> None:
    """Ship a pretraining's image side and head with `model`, as its retrieval.safetensors (float16), so bulk
    captioning stores each photo's vector and search ranks by it. The head must have been trained on the
    features the model reads; with `prepared_dir` the dev split's recall is logged in float32 and as stored,
    which should agree within 0.1."""
    embedder, result = pretrained_embedder(run)
    check_encoder_spec(result["encoder_spec"], load_model(model).features_spec, f"{run} (against {model})")
    if prepared_dir is not None:
        prepared = open_prepared(prepared_dir)
        vectors = sentence_embeddings(prepared, result["sentence_model"], log=log)
        sentences = torch.from_numpy(vectors.astype(np.float32))
        stored = copy.deepcopy(embedder)
        for p in stored.parameters():
            p.copy_(p.half().float())
        for name, e in (("float32", embedder), ("float16 (as stored)", stored)):
            scores = split_recall(e.image_side, e.head, prepared, sentences, "val", torch.device("cpu"))
            log(f"dev split, {name}:\n{format_recall(scores)}")
    add_retrieval(model, embedder, result["sentence_model"])
    log(f"{model}: retrieval.safetensors from {run} (pretraining epoch {result['best_epoch']})")
