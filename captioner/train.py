"""`captioner train`: a plain training loop with explicit state.

Stage 1 trains the decoder on cached features with the encoder frozen; stage 2 (optional,
`finetune_epochs`) then fine-tunes the top encoder blocks end to end on images at a lower learning
rate. Every epoch ends with real decoding of the dev split scored by coco-caption, which drives the
learning-rate plateau schedule, early stopping and the choice of the best model. Checkpoints hold
everything needed to continue exactly: model, optimizer, scheduler, the stage and its boundaries,
history and every process's RNG states; with `deterministic` (the default) a seed gives the same
weights run after run, and a killed run resumed gives the weights of an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .atomic import replace_file, whole_version
from .config import Config
from .decoding_options import DecodingOptions
from .encoders import Encoder, create_encoder
from .evaluate import decode_split, retrieved_memory
from .features import PENDING, Prepared, image_inputs, open_prepared
from .metrics import require_java, score_captions
from .models import (
    CaptionDecoder,
    DecoderOutput,
    check_encoder_spec,
    decoder_from_config,
    decoding_defaults,
    load_model,
    save_model,
)
from .models.files import RETRIEVAL_FILE, add_retrieval, read_retrieval
from .models.lstm import CONCEPT_WEIGHTS
from .objectives import Batch, make_objective
from .runtime import (
    bf16_supported,
    deterministic_algorithms,
    is_main,
    load_checkpoint,
    make_optimizer,
    rank_seed,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup_distributed,
    share_scores_and_rng,
    synchronize,
)
from .vocab import Vocab

if TYPE_CHECKING:
    from .models.retrieval import RetrievalLSTM

# ---------------------------------------------------------------- data

class CaptionSet:
    """One split's images and their captions, encoded once up front.

    Batches are made of whole images with all their captions, so the decoder projects each image's
    features once for its ~5 captions instead of once per caption."""

    def __init__(self, prepared: Prepared, split: str) -> None:
        self.prepared = prepared
        self.rows = prepared.indices(split)  # feature rows of the split's images
        encoded = [[prepared.vocab.encode(c) for c in prepared.records[i].captions] for i in self.rows]
        if not self.rows:
            raise ValueError(f"{prepared.root}: the {split} split has no images with features")
        flat = [e for caps in encoded for e in caps]
        self.lengths = np.array([len(e) for e in flat])
        self.tokens = np.zeros((len(flat), self.lengths.max()), dtype=np.int64)
        for j, e in enumerate(flat):
            self.tokens[j, : len(e)] = e
        bounds = np.cumsum([0] + [len(caps) for caps in encoded])
        self.captions_of = [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.image_lengths = np.array([self.lengths[c].mean() for c in self.captions_of])
        self.memory: np.ndarray | None = None  # (prepared rows, M) retrieved captions, for a retrieval decoder

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
        """Image batches holding about batch_size captions."""
        per_image = len(self.lengths) / len(self.rows)
        return sortish_batches(self.image_lengths, max(1, round(batch_size / per_image)), seed, rank, world)

    def batch(self, images: list[int]) -> tuple[np.ndarray, Tensor, Tensor, Tensor]:
        """Feature rows of the images, and the index of each caption's image among those rows, and
        the captions longest first with their lengths."""
        caps = np.concatenate([self.captions_of[i] for i in images])
        owner = np.concatenate([np.full(len(self.captions_of[i]), k) for k, i in enumerate(images)])
        order = np.argsort(-self.lengths[caps], kind="stable")
        caps, owner = caps[order], owner[order]
        lengths = self.lengths[caps]
        rows = np.array([self.rows[i] for i in images])
        return (rows, torch.from_numpy(owner), torch.from_numpy(self.tokens[caps, : lengths[0]]),
                torch.from_numpy(lengths))

    def on_device(self, images: list[int], inputs: Callable[[np.ndarray], Tensor], device: torch.device,
                  teacher_forcing: float = 1.0) -> Batch:
        """The Batch of these images and their captions on `device`; `inputs` turns their feature rows
        into what the model takes (cached features, or images in stage 2)."""
        rows, owner, captions, lengths = self.batch(images)
        memory = torch.from_numpy(self.memory[rows]).to(device) if self.memory is not None else None
        return Batch(inputs(rows), rows, owner.to(device), captions.to(device), lengths.to(device), teacher_forcing,
                     memory)

    def features(self, rows: np.ndarray) -> Tensor:
        return torch.from_numpy(self.prepared.features[rows].astype(np.float32))


def sortish_batches(lengths: np.ndarray, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """Shuffle, sort chunks of 50 batches by length, cut into batches, shuffle the batches.

    Batches hold items of similar (caption) length, so few steps run for a handful of stragglers,
    while the order stays random. The permutation depends only on the seed (derived from the epoch),
    so a resumed run sees the same batches; under DDP each rank takes every world-th batch.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    chunk = batch_size * 50
    batches = []
    for s in range(0, len(order), chunk):
        part = order[s:s + chunk]
        part = part[np.argsort(-lengths[part], kind="stable")]
        batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    usable = len(batches) - len(batches) % world if world > 1 else len(batches)
    return batches[rank:usable:world]


def teacher_forcing_ratio(cfg: Config, epoch: int) -> float:
    """Linear move from teacher_forcing_start to teacher_forcing_end over teacher_forcing_epochs."""
    if cfg.teacher_forcing_epochs <= 0:
        return cfg.teacher_forcing_end
    frac = min(1.0, epoch / cfg.teacher_forcing_epochs)
    return cfg.teacher_forcing_start + frac * (cfg.teacher_forcing_end - cfg.teacher_forcing_start)


# ---------------------------------------------------------------- state

@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    epochs: int = 0  # stage 1's length: cfg.epochs, or what a resumed run changed it to where it could
    stage: str = "train"  # the stage of the next epoch: train (stage 1) or finetune (stage 2)
    stage_start: int = 0  # the epoch after which the current stage began
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    precision: str = ""  # float32 or bfloat16, measured when the run starts ("" until then)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5, patience=1)
    if cfg.schedule == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr,
                                                   total_steps=max(1, steps_per_epoch * epochs))
    if cfg.schedule == "warmup":  # what transformers need: no total step count, so more epochs stay honest
        warmup = max(1, cfg.warmup_steps)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min((step + 1) / warmup,
                                                                             math.sqrt(warmup / (step + 1))))
    if cfg.schedule == "none":
        return None
    raise ValueError(f"schedule must be plateau, onecycle, warmup or none, not {cfg.schedule!r}")


# ---------------------------------------------------------------- evaluation during training

def validate(decoder: nn.Module, prepared: Prepared, cfg: Config, device: torch.device,
             encoder: Encoder | None = None, memory: np.ndarray | None = None) -> dict[str, float]:
    """Dev scores of the model as it will caption (its decoding options), at val_beam_size."""
    rows = prepared.indices("val")
    if cfg.val_images:
        rows = rows[: cfg.val_images]
    opts = DecodingOptions(**{**decoding_defaults(cfg), "beam_size": cfg.val_beam_size})
    predictions = decode_split(decoder, prepared, rows, opts, device, encoder, memory=memory)
    return score_captions(predictions, prepared.references(rows), metrics=("Bleu_4", "CIDEr"))


def check_before_training(cfg: Config, prepared: Prepared) -> None:
    """What would otherwise fail only after a whole epoch (or a whole stage 1) fails now, saying how to
    fix it. The options themselves were checked when the config was read."""
    todo = int((prepared.status == PENDING).sum())
    if todo:
        raise ValueError(f"{prepared.root}: `captioner prepare` did not finish ({todo} of {len(prepared.status)} "
                         "images still to encode); run it again to complete the folder")
    if not prepared.indices("val"):
        raise ValueError(f"{prepared.root}: the val split has no images, and every epoch is scored on it; "
                         "prepare a dataset with a dev split (one without splits gets 5% of its images as dev)")
    require_java("every epoch is scored by coco-caption, whose scorers")
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise FileNotFoundError("pycocoevalcap: not installed; every epoch is scored by coco-caption: "
                                "`pip install 'captioner[train]'`")
    if cfg.finetune_epochs:
        missing = [str(prepared.records[i].image) for split in ("train", "val") for i in prepared.indices(split)
                   if not prepared.records[i].image.exists()]
        if missing:
            raise FileNotFoundError(f"stage 2 (finetune_epochs {cfg.finetune_epochs}) reads the images again, and "
                                    f"{len(missing)} are missing, e.g. {missing[0]}; restore them or set "
                                    "--finetune-epochs 0")


# ---------------------------------------------------------------- logging

def write_history(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv and curves.png, rewritten from the full history so a resumed run stays whole, each
    through atomic.replace_file."""
    if not history:
        return
    keys = list(history[0])

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(history)

    replace_file(run_dir / "metrics.csv", write_csv)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    epochs = [h["epoch"] for h in history]
    titles = {"train_loss": "loss", "train_top5": "top-5 accuracy", "val_Bleu_4": "BLEU-4 (dev)",
              "val_CIDEr": "CIDEr (dev)"}
    panels = [(key, titles.get(key, key)) for key in keys if key.startswith(("train_", "val_"))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(epochs, [h[key] for h in history], marker="o")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    replace_file(run_dir / "curves.png", lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------- the loop

def train_step(model: nn.Module, objective: Callable, optimizer: torch.optim.Optimizer, batch: Batch,
               grad_clip: float = 0.0, use_amp: bool = False) -> dict[str, Tensor | int]:
    """One optimizer step on one batch: the objective under bfloat16 autocast if use_amp, backward,
    clipping, update. Returns the objective's logs (sums) and their count `n`."""
    with torch.autocast(batch.captions.device.type, dtype=torch.bfloat16, enabled=use_amp):
        result = objective(model, batch)
    optimizer.zero_grad(set_to_none=True)
    result.loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return {**result.logs, "n": result.n}


def run_epoch(model: nn.Module, objective: Callable, data: CaptionSet, batches: list[list[int]],
              optimizer: torch.optim.Optimizer, scheduler, cfg: Config, device: torch.device, tf_ratio: float,
              inputs: Callable[[np.ndarray], Tensor], desc: str = "train",
              augment: Callable[[Batch], Batch] | None = None, use_amp: bool = False) -> dict[str, float]:
    """One pass over the batches; `inputs` turns feature rows into what the model takes: cached
    features in stage 1, images in stage 2, where `augment` may change each batch.
    Returns the objective's logs averaged over the epoch."""
    model.train()
    totals: dict[str, float] = {}
    bar = tqdm(batches, desc=desc, unit="batch", disable=not is_main(), leave=False,
               mininterval=0.1 if sys.stderr.isatty() else 60)  # a log file gets a line a minute
    for idx in bar:
        batch = data.on_device(idx, inputs, device, tf_ratio)
        if augment is not None:
            batch = augment(batch)
        logs = train_step(model, objective, optimizer, batch, cfg.grad_clip, use_amp)
        if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()  # the per-batch schedules
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        bar.set_postfix(loss=f"{totals['loss'] / totals['n']:.3f}", refresh=False)
    n = max(1.0, totals.pop("n", 0.0))
    return {f"train_{key}": value / n for key, value in totals.items()}


class EndToEnd(nn.Module):
    """Encoder and decoder as one module for stage 2, so DDP syncs both."""

    def __init__(self, encoder: Encoder, decoder: nn.Module) -> None:
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, images: Tensor, captions: Tensor, lengths: Tensor, image_index: Tensor | None = None,
                teacher_forcing: float = 1.0) -> DecoderOutput:
        return self.decoder(self.encoder.regions(images), captions, lengths, image_index, teacher_forcing)


MIRRORED_WORDS = (("left", "right"),)


def mirror_batch(vocab: Vocab, device: torch.device) -> Callable[[Batch], Batch]:
    """Stage 2's augmentation: each image mirrored with probability 1/2 (the global torch RNG, which
    checkpoints save), and its captions' "left" and "right" swapped, so mirroring never teaches the
    decoder that a dog on the left is "on the right"."""
    swap = torch.arange(len(vocab))
    for a, b in MIRRORED_WORDS:
        if a in vocab.stoi and b in vocab.stoi:
            swap[vocab.stoi[a]], swap[vocab.stoi[b]] = vocab.stoi[b], vocab.stoi[a]
    swap = swap.to(device)

    def augment(batch: Batch) -> Batch:
        flip = (torch.rand(len(batch.rows)) < 0.5).to(device)
        images = torch.where(flip[:, None, None, None], batch.inputs.flip(-1), batch.inputs)
        captions = torch.where(flip[batch.owner][:, None], swap[batch.captions], batch.captions)
        return replace(batch, inputs=images, captions=captions)
    return augment


def new_decoder(cfg: Config, prepared: Prepared) -> CaptionDecoder:
    """The untrained decoder cfg describes over the prepared folder's vocabulary and features; with
    concept_input or concept_copy it gets the ImageNet classifier of the encoder that made the
    features, and each class's caption word in the vocabulary."""
    classifier = None
    if cfg.concept_input or cfg.concept_copy:
        from .concepts import class_word_ids
        from .encoders import pretrained_head

        head = pretrained_head(prepared.spec)
        if head is None:
            raise ValueError(f"concept_input and concept_copy need features with an ImageNet classifier over them "
                             f"(EfficientNet-Lite, feature_layer head); {prepared.root} has "
                             f"{prepared.spec['encoder']} {prepared.spec['layer']} features")
        classifier = (*head, class_word_ids(prepared.vocab))
    return decoder_from_config(cfg, len(prepared.vocab), prepared.spec["channels"], prepared.vocab.itos, classifier)


def init_decoder_from(decoder: CaptionDecoder, path: str | Path, prepared: Prepared) -> None:
    """Start from a trained model's decoder weights (self-critical training starts from a cross-entropy
    model): the same family and sizes, trained on the same vocabulary and features. A model without
    concept input or copying may start one with them: their layers keep their initial values (concept
    input's is zero, so training begins from exactly that model)."""
    loaded = load_model(path)
    if loaded.vocab.itos != prepared.vocab.itos:
        raise ValueError(f"init_from {path} was trained with another vocabulary than {prepared.root}")
    check_encoder_spec(loaded.features_spec, prepared.spec, f"init_from {path} (against {prepared.root})")
    if loaded.decoder.family != decoder.family:
        raise ValueError(f"init_from {path} is a {loaded.decoder.family} decoder, the config asks for {decoder.family}")
    try:
        missing, unexpected = decoder.load_state_dict(loaded.decoder.state_dict(), strict=False)
        if unexpected or any(not key.startswith(CONCEPT_WEIGHTS) for key in missing):
            raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
    except RuntimeError as err:  # other sizes: name the arguments that differ
        theirs, ours = loaded.decoder.arguments(), decoder.arguments()
        differ = [f"{k} {v!r} (model) != {ours.get(k)!r} (config)" for k, v in theirs.items() if ours.get(k) != v]
        raise ValueError(f"init_from {path} does not fit the configured decoder: {'; '.join(differ) or err}") from None


def wrap_ddp(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """`module` under DistributedDataParallel when the run has several processes, else itself."""
    if world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


# What a resumed run may change: how long it runs, where, and where it finds its files; not what it trains.
RESUME_MAY_CHANGE = frozenset({"epochs", "finetune_epochs", "patience", "device", "num_workers", "val_images",
                               "deterministic", "amp", "data", "images", "prepared", "run_dir"})


@contextlib.contextmanager
def save_errors_explained(run_dir: Path, what: str, resumable: bool) -> Iterator[None]:
    """A full disk or a read-only run folder ends the run with what to do, not a traceback (the CLI
    prints OSErrors); every write is atomic, so what is on disk is still whole."""
    try:
        yield
    except OSError as err:
        again = "the same command with --resume" if resumable else "the same command again"
        where = f" ({err.filename})" if err.filename else ""
        raise OSError(err.errno, f"cannot save {what} in {run_dir}: {err.strerror or err}{where}; the files there "
                      f"are whole: free space or make the folder writable, then run {again}") from err


def check_resumed_config(saved: Config, cfg: Config, run_dir: Path) -> None:
    """A resumed run must go on training what it started; name every option that differs."""
    before = saved.to_dict()
    changed = [f"{key} ({before[key]!r} -> {value!r})" for key, value in cfg.to_dict().items()
               if key not in RESUME_MAY_CHANGE and before.get(key) != value]
    if changed:
        raise ValueError(f"{run_dir} was started with other options: {', '.join(changed)}; resume with the "
                         "run's own options (its config.json) or start a new --run-dir")


def check_resumed_stage(state: TrainState, cfg: Config, run_dir: Path) -> None:
    """A resumed run may lengthen or shorten stage 1 only while it is in stage 1 and its schedule does
    not depend on the length; anything else is refused, naming the option (finetune_epochs may always change)."""
    if cfg.epochs == state.epochs:
        return
    if state.stage == "finetune":
        raise ValueError(f"--epochs {cfg.epochs}: {run_dir} ended stage 1 after epoch {state.stage_start} and is "
                         f"fine-tuning, so stage 1 cannot change; resume with --epochs {state.epochs} "
                         "(--finetune-epochs may change)")
    if cfg.schedule == "onecycle":
        raise ValueError(f"--epochs {cfg.epochs}: the one-cycle schedule of {run_dir} spans {state.epochs} stage-1 "
                         f"epochs and cannot be stretched or cut; resume with --epochs {state.epochs}")
    state.epochs = cfg.epochs


def next_stage(state: TrainState, cfg: Config) -> str | None:
    """The stage of the next epoch, moving on to stage 2 once stage 1 has run its epochs; None when
    training is over (all epochs run, or no better dev score for `patience` epochs)."""
    if state.bad_epochs >= cfg.patience:
        return None
    if state.stage == "train" and state.epoch >= state.epochs:
        if cfg.finetune_epochs == 0:
            return None
        state.stage, state.stage_start, state.bad_epochs = "finetune", state.epoch, 0
    if state.stage == "finetune" and state.epoch >= state.stage_start + cfg.finetune_epochs:
        return None
    return state.stage


def train(cfg: Config, resume: bool = False, log: Callable[[str], None] = print) -> TrainState:
    """Train as `cfg` says, writing checkpoints, the best model and curves into cfg.run_dir.

    With cfg.deterministic a seed gives bit-identical weights: deterministic kernels, and on CUDA a
    fixed cuBLAS workspace, which cuBLAS reads from the environment when CUDA starts, so it is set here,
    before this process touches CUDA."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with deterministic_algorithms(cfg.deterministic):
        return _train(cfg, resume, log)


@dataclass
class Run:
    """What stays the same for a whole run: its options and folder, the data, the decoder it trains and
    the processes it runs on."""

    cfg: Config
    dir: Path
    prepared: Prepared
    data: CaptionSet
    decoder: CaptionDecoder
    device: torch.device
    rank: int
    world: int
    features_encoder: dict[str, Tensor] | None  # the fine-tuned encoder that made the features: models carry it
    log: Callable[[str], None]

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    def save_best(self, encoder: Encoder | None) -> None:
        """best/: the model, and for a retrieval decoder the image embedder and datastore it reads."""
        state = encoder.state_dict() if encoder is not None else self.features_encoder
        save_model(self.dir / "best", self.decoder, self.prepared.vocab, self.prepared.spec,
                   decoding_defaults(self.cfg), encoder_state=state)
        if self.data.memory is not None:
            embedder = read_retrieval(Path(self.cfg.embedder_from))
            if embedder is None:
                raise ValueError(f"embedder_from {self.cfg.embedder_from} ships no image embedder; a retrieval "
                                 "decoder's model folder needs one")
            add_retrieval(self.dir / "best", embedder, datastore=self.cfg.datastore)


@dataclass
class Stage:
    """What one stage trains and how it makes its inputs: stage 1 ("train") the decoder on cached
    features, stage 2 ("finetune") the encoder's top blocks with it, on images."""

    name: str
    model: nn.Module  # what the optimizer steps: the decoder, or encoder and decoder (under DDP, wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    inputs: Callable[[np.ndarray], Tensor]  # feature rows -> the model's input
    encoder: Encoder | None = None
    augment: Callable[[Batch], Batch] | None = None


def stage_one(run: Run) -> Stage:
    cfg = run.cfg
    model = wrap_ddp(run.decoder, run.device, run.world)
    optimizer = make_optimizer(cfg.optimizer, run.decoder.parameters(), cfg.lr, cfg.weight_decay)
    steps = len(run.data.batches(cfg.batch_size, 0, run.rank, run.world))
    return Stage("train", model, optimizer, make_scheduler(cfg, optimizer, steps, cfg.epochs),
                 lambda rows: run.data.features(rows).to(run.device, non_blocking=True))


def stage_two(run: Run) -> Stage:
    """The encoder the features came from (its fine-tuned weights, when it was fine-tuned before), its
    top blocks unfrozen, a new optimizer at finetune_lr, images mirrored at random."""
    cfg, spec, device = run.cfg, run.prepared.spec, run.device
    encoder = create_encoder(spec["encoder"], pretrained=True, image_size=spec["image_size"], layer=spec["layer"])
    if run.features_encoder is not None:  # go on from the earlier fine-tuning
        encoder.load_state_dict(run.features_encoder)
    encoder.set_trainable_blocks(cfg.finetune_blocks)
    encoder.to(device)
    params = list(run.decoder.parameters()) + [p for p in encoder.parameters() if p.requires_grad]
    optimizer = make_optimizer(cfg.optimizer, params, cfg.finetune_lr, cfg.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, 1, 1) if cfg.schedule == "plateau" else None
    return Stage("finetune", wrap_ddp(EndToEnd(encoder, run.decoder), device, run.world), optimizer, scheduler,
                 image_inputs(encoder, run.prepared, device), encoder,
                 mirror_batch(run.prepared.vocab, device) if cfg.finetune_mirror else None)


def start_run(cfg: Config, resume: bool, log: Callable[[str], None]) -> Run:
    """Join the processes, check the folder against --resume, open the data and build the decoder
    (from init_from or a contrastive pretraining when the options say so)."""
    device, rank, world = setup_distributed(cfg.device)
    run_dir = Path(cfg.run_dir)
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    last_path = run_dir / "last.pt"
    if resume and not last_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {last_path}")
    if not resume and last_path.exists():
        raise ValueError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --run-dir")
    if resume and (run_dir / "config.json").exists():
        check_resumed_config(Config.load(run_dir / "config.json"), cfg, run_dir)
    prepared = open_prepared(cfg.prepared)
    check_before_training(cfg, prepared)
    features_encoder = prepared.encoder_state()
    seed_everything(cfg.seed)  # the same initial weights on every rank
    data = CaptionSet(prepared, "train")
    decoder = new_decoder(cfg, prepared).to(device)
    if getattr(decoder, "reads_memory", False):
        data.memory = leave_one_out_memory(cfg, prepared, decoder, log)
    if cfg.init_from and cfg.pretrain != "none":
        raise ValueError(f"init_from ({cfg.init_from}) and pretrain ({cfg.pretrain}) both set the decoder's start: "
                         "choose one")
    if cfg.init_from and not resume:  # a resumed run has its own weights in the checkpoint
        init_decoder_from(decoder, cfg.init_from, prepared)
    if cfg.pretrain != "none" and not resume:  # a resumed run's decoder, image side included, is in last.pt
        from .contrastive import pretrain_image_side

        pretrain_image_side(cfg, decoder, prepared, device, log)
    return Run(cfg, run_dir, prepared, data, decoder, device, rank, world, features_encoder, log)


def leave_one_out_memory(cfg: Config, prepared: Prepared, decoder: CaptionDecoder,
                         log: Callable[[str], None]) -> np.ndarray:
    """Every prepared photo's retrieved captions for a retrieval decoder, found with embedder_from's image
    embedder (the one the trained model carries and caption uses), never the photo's own captions."""
    from .datastore import load_datastore

    if not cfg.datastore or not cfg.embedder_from:
        raise ValueError("decoder retrieval needs datastore (a `captioner datastore build` folder) and embedder_from "
                         "(a model folder with retrieval.safetensors)")
    embedder = read_retrieval(Path(cfg.embedder_from))
    if embedder is None:
        raise ValueError(f"embedder_from: {cfg.embedder_from} has no image embedder ({RETRIEVAL_FILE})")
    reader = cast("RetrievalLSTM", decoder)  # decoder retrieval
    return retrieved_memory(prepared, embedder, load_datastore(cfg.datastore), reader, prepared.vocab, leave_out=True,
                            log=log)


def resume_run(run: Run, stage: Stage) -> tuple[TrainState, Stage]:
    """The state and stage of the run in last.pt, with every process's random state where it was."""
    ckpt = load_checkpoint(run.last)
    state = TrainState(**ckpt["train_state"])
    check_resumed_stage(state, run.cfg, run.dir)
    run.decoder.load_state_dict(ckpt["decoder"])
    if ckpt["stage"] == "finetune":
        stage = stage_two(run)
        assert stage.encoder is not None  # stage 2 trains the encoder
        stage.encoder.load_state_dict(ckpt["encoder"])
    stage.optimizer.load_state_dict(ckpt["optimizer"])
    if stage.scheduler is not None and ckpt["scheduler"] is not None:
        stage.scheduler.load_state_dict(ckpt["scheduler"])
    if len(ckpt["rng"]) == run.world:
        set_rng_state(ckpt["rng"][run.rank])
    else:  # batches are dealt to ranks by the world size too: the run goes on, not bit for bit
        run.log(f"note: {run.last} was written by {len(ckpt['rng'])} process(es), this run has {run.world}: "
                "it goes on, but will not match an uninterrupted run exactly")
        seed_everything(rank_seed(run.cfg.seed + state.epoch, run.rank))
    run.log(f"resumed {run.dir} after epoch {state.epoch}")
    return state, stage


def score_start(run: Run, state: TrainState) -> None:
    """A run from init_from starts at epoch 0 with the model it was given, so a worse first epoch is
    never kept as best."""
    scores, _ = share_scores_and_rng(validate(run.decoder, run.prepared, run.cfg, run.device,
                                              memory=run.data.memory) if is_main() else {},
                                     run.world)
    state.best_score, state.best_epoch = scores[run.cfg.val_metric], 0
    if is_main():
        with save_errors_explained(run.dir, "epoch 0", False):
            run.save_best(None)
        run.log(f"epoch 0 ({run.cfg.init_from}): dev BLEU-4 {100 * scores['Bleu_4']:.1f} "
                f"CIDEr {100 * scores['CIDEr']:.1f}")


def enter_stage_two(run: Run) -> Stage:
    """Stage 2 fine-tunes from the best stage-1 decoder, not the last."""
    if run.world > 1:
        dist.barrier()  # rank 0 writes best/ at the end of stage 1; the others read it here
    if whole_version(run.dir / "best").exists():
        run.decoder.load_state_dict(load_model(run.dir / "best", run.device).decoder.state_dict())
    return stage_two(run)


PRECISION_STEPS = 2, 3  # warm-up and timed training steps of each precision when a run starts
BFLOAT16_MARGIN = 0.9  # bfloat16 is chosen only when its step takes under 0.9x float32's


def choose_precision(run: Run, stage: Stage, objective: Callable) -> str:
    """float32, or bfloat16 autocast where the config allows it (amp), the device has it, and it measures
    clearly faster: a few real training steps of each on copies of the model and optimizer, under a forked
    random state, so the run itself is untouched. CPU flags alone mislead: bfloat16 was 1.5x faster
    on an AMD EPYC and 1.3x slower on an Intel Xeon, both with native bfloat16."""
    cfg = run.cfg
    if not cfg.amp or not bf16_supported(run.device):
        return "float32"
    warm, timed = PRECISION_STEPS
    batches = run.data.batches(cfg.batch_size, cfg.seed, run.rank, run.world)[: warm + timed]
    warm = min(warm, len(batches) - 1)  # a tiny train split: fewer warm-up steps, at least one timed
    if warm < 0:
        return "float32"
    seconds = {}
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for precision in ("float32", "bfloat16"):
            model = copy.deepcopy(getattr(stage.model, "module", stage.model))  # without DDP's wrapper
            optimizer = make_optimizer(cfg.optimizer, model.parameters(), stage.optimizer.param_groups[0]["lr"],
                                       cfg.weight_decay)
            for i, rows in enumerate(batches):
                if i == warm:
                    synchronize(run.device)
                    start = time.perf_counter()
                batch = run.data.on_device(rows, stage.inputs, run.device)
                train_step(model, objective, optimizer, batch, cfg.grad_clip, precision == "bfloat16")
            synchronize(run.device)
            seconds[precision] = (time.perf_counter() - start) / (len(batches) - warm)
    # a clear margin, so that runs on one machine keep choosing alike (a seed's runs stay bit-identical)
    choice = "bfloat16" if seconds["bfloat16"] < BFLOAT16_MARGIN * seconds["float32"] else "float32"
    if run.world > 1:  # every rank trains in rank 0's choice
        chosen = [choice]
        dist.broadcast_object_list(chosen, src=0)
        choice = chosen[0]
    run.log(f"precision: {choice} (a training step took {1000 * seconds['float32']:.0f} ms in float32, "
            f"{1000 * seconds['bfloat16']:.0f} ms under bfloat16 autocast; amp: false keeps float32)")
    return choice


def train_epoch(run: Run, stage: Stage, state: TrainState, objective: Callable) -> tuple[dict, dict, list[dict]]:
    """One epoch of `stage`, then the dev scores: the history row, the scores and every rank's RNG state."""
    cfg = run.cfg
    tf_ratio = teacher_forcing_ratio(cfg, state.epoch)
    batches = run.data.batches(cfg.batch_size, cfg.seed * 1000 + state.epoch, run.rank, run.world)
    planned = (state.epochs if stage.name == "train" else state.stage_start) + cfg.finetune_epochs
    start = time.time()
    stats = run_epoch(stage.model, objective, run.data, batches, stage.optimizer, stage.scheduler, cfg, run.device,
                      tf_ratio, stage.inputs, desc=f"epoch {state.epoch + 1}/{planned} {stage.name}",
                      augment=stage.augment, use_amp=state.precision == "bfloat16")
    seconds = time.time() - start
    scores = validate(run.decoder, run.prepared, cfg, run.device, stage.encoder, run.data.memory) if is_main() else {}
    scores, rng = share_scores_and_rng(scores, run.world)
    if isinstance(stage.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        stage.scheduler.step(scores[cfg.val_metric])
    captions = sum(len(run.data.captions_of[i]) for b in batches for i in b) * run.world
    row = {"epoch": state.epoch + 1, "stage": stage.name, **stats, "val_Bleu_4": scores["Bleu_4"],
           "val_CIDEr": scores["CIDEr"], "teacher_forcing": tf_ratio, "lr": stage.optimizer.param_groups[0]["lr"],
           "seconds": round(seconds, 1), "captions_per_s": round(captions / seconds, 1), "precision": state.precision}
    return row, scores, rng


def end_epoch(run: Run, stage: Stage, state: TrainState, row: dict, scores: dict, rng: list[dict]) -> None:
    """Count the epoch, keep the best model, move to stage 2 or stop when the dev score stalls, and save
    the checkpoint and curves (rank 0)."""
    cfg = run.cfg
    state.epoch += 1
    state.history.append(row)
    score = scores[cfg.val_metric]
    improved = score > state.best_score
    if improved:
        state.best_score, state.best_epoch, state.bad_epochs = score, state.epoch, 0
    else:
        state.bad_epochs += 1
    if state.bad_epochs >= cfg.patience and stage.name == "train" and cfg.finetune_epochs > 0:
        run.log(f"no better dev {cfg.val_metric} for {cfg.patience} epochs: on to fine-tuning")
        state.stage, state.stage_start, state.bad_epochs = "finetune", state.epoch, 0
    if not is_main():
        return
    with save_errors_explained(run.dir, f"epoch {state.epoch}", run.last.exists()):
        if improved:
            run.save_best(stage.encoder)
        save_checkpoint(run.last, stage=stage.name, decoder=run.decoder.state_dict(),
                        optimizer=stage.optimizer.state_dict(),
                        scheduler=stage.scheduler.state_dict() if stage.scheduler is not None else None,
                        encoder=stage.encoder.state_dict() if stage.encoder is not None else None,
                        train_state=vars(state), rng=rng)
        write_history(run.dir, state.history)
    train_logs = " ".join(f"{key.removeprefix('train_')} {value:.3f}" for key, value in row.items()
                          if key.startswith("train_"))
    run.log(f"epoch {state.epoch}: {train_logs} dev BLEU-4 {100 * scores['Bleu_4']:.1f} CIDEr "
            f"{100 * scores['CIDEr']:.1f}{' (best)' if improved else ''} [{row['seconds']:.0f}s, "
            f"{row['captions_per_s']} captions/s]")
    if state.bad_epochs >= cfg.patience:
        run.log(f"early stop: no better dev {cfg.val_metric} for {cfg.patience} epochs")


def _train(cfg: Config, resume: bool, log: Callable[[str], None]) -> TrainState:
    run = start_run(cfg, resume, log)
    objective = make_objective(cfg, run.prepared)
    stage = stage_one(run)
    state = TrainState(epochs=cfg.epochs)
    if run.world > 1:
        seed_everything(rank_seed(cfg.seed, run.rank))
    if resume:
        state, stage = resume_run(run, stage)
    if is_main():
        with save_errors_explained(run.dir, "the run's config", resume):
            cfg.save(run.dir / "config.json")
        n_params = sum(p.numel() for p in run.decoder.parameters() if p.requires_grad)
        log(f"training on {run.device} ({run.world} process{'es' if run.world > 1 else ''}): {len(run.data)} "
            f"captions, {len(run.prepared.vocab)} words, decoder {n_params / 1e6:.1f}M parameters")
    if cfg.init_from and not resume:
        score_start(run, state)
    if not state.precision or not cfg.amp:  # a resumed run keeps its precision unless amp is now off
        state.precision = choose_precision(run, stage, objective)
    while (name := next_stage(state, cfg)) is not None:
        if name != stage.name:
            stage = enter_stage_two(run)
        row, scores, rng = train_epoch(run, stage, state, objective)
        end_epoch(run, stage, state, row, scores, rng)
    if is_main():
        hours = sum(h["seconds"] for h in state.history) / 3600
        log(f"best dev {cfg.val_metric} {100 * state.best_score:.1f} at epoch {state.best_epoch}: {run.dir / 'best'} "
            f"({hours:.2f} h of training epochs)")
    if dist.is_initialized():
        dist.barrier()  # every rank has finished writing before any process ends
    return state


def lr_find(cfg: Config, start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100,
            log: Callable[[str], None] = print) -> tuple[list[float], list[float], float]:
    """Learning-rate range test (Smith 2017): raise the rate exponentially batch by batch and watch the
    loss; a good rate sits a little below where the loss falls fastest. Writes lr_find.png."""
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    prepared = open_prepared(cfg.prepared)
    data = CaptionSet(prepared, "train")
    decoder = new_decoder(cfg, prepared).to(device).train()
    objective = make_objective(cfg, prepared)
    optimizer = make_optimizer(cfg.optimizer, list(decoder.parameters()), start_lr, cfg.weight_decay)
    batches = data.batches(cfg.batch_size, cfg.seed)
    factor = (end_lr / start_lr) ** (1 / max(1, steps - 1))
    lrs, losses, smooth, best = [], [], 0.0, math.inf
    for i in range(steps):
        lr = start_lr * factor ** i
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data.on_device(batches[i % len(batches)], lambda rows: data.features(rows).to(device), device)
        logs = train_step(decoder, objective, optimizer, batch, cfg.grad_clip, cfg.amp and bf16_supported(device))
        smooth = 0.9 * smooth + 0.1 * float(logs["loss"]) / float(logs["n"])
        value = smooth / (1 - 0.9 ** (i + 1))  # bias-corrected running mean
        lrs.append(lr)
        losses.append(value)
        best = min(best, value)
        if not math.isfinite(value) or value > 4 * best:
            break
    slopes = np.gradient(np.array(losses), np.log(np.array(lrs))) if len(lrs) > 2 else np.zeros(len(lrs))
    suggestion = lrs[int(np.argmin(slopes))] if len(lrs) > 2 else start_lr
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.semilogx(lrs, losses)
        ax.axvline(suggestion, color="red", linestyle="--", label=f"steepest: {suggestion:.1e}")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss (smoothed)")
        ax.legend()
        fig.tight_layout()
        replace_file(run_dir / "lr_find.png", lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
        plt.close(fig)
    except ImportError:
        pass
    log(f"steepest loss descent at lr {suggestion:.2e} ({len(lrs)} steps); plot: {run_dir / 'lr_find.png'}")
    return lrs, losses, suggestion
