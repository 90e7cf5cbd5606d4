"""`captioner train`: a plain training loop with explicit state.

Stage 1 trains the decoder on cached features with the encoder frozen; stage 2 (optional,
`finetune_epochs`) then fine-tunes the top encoder blocks end to end on images at a lower learning
rate. Every epoch ends with real decoding of the dev split scored by coco-caption, which drives the
learning-rate plateau schedule, early stopping and the choice of the best model. Checkpoints hold
everything needed to continue exactly: model, optimizer, scheduler, the stage and its boundaries,
history and every process's RNG states; with `deterministic` (the default) a seed gives the same
weights run after run, and a killed run resumed gives the weights of an uninterrupted one.

The file reads top down: the state, the run, resuming, the stages, an epoch. One step is
step.train_step; the batches come from batching.py and the precision from precision.py.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import importlib.util
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from .atomic import replace_file, whole_version
from .batching import CaptionSet
from .config import Config
from .decoding_options import DecodingOptions
from .encoders import Encoder, create_encoder
from .evaluate import decode_split, retrieved_memory
from .extras import install_hint
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
from .objectives import Batch, CrossEntropy, make_objective
from .precision import choose_precision
from .runtime import (
    deterministic_algorithms,
    is_main,
    load_checkpoint,
    make_optimizer,
    rank_seed,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    setup_distributed,
    shard,
    share_scores_and_rng,
)
from .step import train_step
from .visualize import plot_curves
from .vocab import Vocab

if TYPE_CHECKING:
    from .models.retrieval import RetrievalLSTM

# ---------------------------------------------------------------- state

@dataclass
class TrainState:
    """The loop's progress, saved in every checkpoint (vars(state)) and taken back on resume."""

    epoch: int = 0  # epochs completed
    epochs: int = 0  # stage 1's length: cfg.epochs, or what a resumed run changed it to where it could
    stage: str = "train"  # the stage of the next epoch: train (stage 1) or finetune (stage 2)
    stage_start: int = 0  # the epoch after which the current stage began
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    precision: str = ""  # float32 or bfloat16, measured when the run starts ("" until then)


@dataclass
class Run:
    """What stays the same for a whole run: its options and folder, the data, the decoder it trains and
    the processes it runs on."""

    cfg: Config
    dir: Path
    prepared: Prepared
    data: CaptionSet  # the train split
    dev: CaptionSet  # the dev split, for the dev loss
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
                   decoding_defaults(self.cfg), encoder_state=state, fit=self.cfg.fit)
        if self.data.memory is not None:
            embedder = read_retrieval(Path(self.cfg.embedder_from))
            if embedder is None:
                raise ValueError(f"embedder_from {self.cfg.embedder_from} ships no image embedder; a retrieval "
                                 "decoder's model folder needs one")
            add_retrieval(self.dir / "best", embedder, datastore=self.cfg.datastore)


@dataclass
class Stage:
    """What one stage trains and how it makes its inputs: stage 1 (named "train" in checkpoints and
    metrics.csv) the decoder on cached features, stage 2 ("finetune") the encoder's top blocks with it,
    on images."""

    name: str
    model: nn.Module  # what the optimizer steps: the decoder, or encoder and decoder (under DDP, wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    inputs: Callable[[np.ndarray], Tensor]  # feature rows -> the model's input
    encoder: Encoder | None = None
    augment: Callable[[Batch], Batch] | None = None


# ---------------------------------------------------------------- the run

def train(cfg: Config, resume: bool = False, log: Callable[[str], None] = print) -> TrainState:
    """Train as `cfg` says, writing checkpoints, the best model, metrics, curves and the log into cfg.run_dir.

    With cfg.deterministic a seed gives bit-identical weights: deterministic kernels, and on CUDA a
    fixed cuBLAS workspace, which cuBLAS reads from the environment when CUDA starts, so it is set here,
    before this process touches CUDA."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    with deterministic_algorithms(cfg.deterministic), LogFile(Path(cfg.run_dir) / "train.log", log) as log_file:
        return run_training(cfg, resume, log_file if shard()[0] == 0 else log)  # rank 0 keeps the log


def run_training(cfg: Config, resume: bool, log: Callable[[str], None]) -> TrainState:
    """The run from top to bottom: start (or resume) it, then epoch after epoch of the current stage
    until next_stage says training is over."""
    run = start_run(cfg, resume, log)
    objective = make_objective(cfg, run.prepared)
    stage = decoder_stage(run)
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
    if cfg.init_from and not resume and not cfg.train_added_only:  # trained for what it adds, the start is no candidate
        score_start(run, state)
    if not state.precision or not cfg.amp:  # a resumed run keeps its precision unless amp is now off
        state.precision = choose_precision(cfg, getattr(stage.model, "module", stage.model),  # without DDP's wrapper
                                           stage.optimizer.param_groups[0]["lr"], objective,
                                           run.data.batches(cfg.batch_size, cfg.seed, run.rank, run.world),
                                           functools.partial(run.data.on_device, inputs=stage.inputs,
                                                             device=run.device),
                                           run.device, run.world, log)
    while (name := next_stage(state, cfg)) is not None:
        if name != stage.name:
            stage = enter_finetuning(run)
        row, scores, rng = train_epoch(run, stage, state, objective)
        end_epoch(run, stage, state, row, scores, rng)
    if is_main() and state.best_epoch < 0:  # epochs 0 and no init_from: nothing was trained or kept
        log(f"no caption training epochs ran (epochs {cfg.epochs}), so no model was saved; what ran before them "
            f"is in {run.dir}")
    elif is_main():
        hours = sum(h["seconds"] for h in state.history) / 3600
        log(f"best dev {cfg.val_metric} {100 * state.best_score:.1f} at epoch {state.best_epoch}: {run.dir / 'best'} "
            f"({hours:.2f} h of training epochs)")
        curves = f"curves: {run.dir / 'curves.png'}; " if (run.dir / "curves.png").exists() else ""
        log(f"{curves}every epoch's figures: {run.dir / 'metrics.csv'}; this log: {run.dir / 'train.log'}")
    if dist.is_initialized():
        dist.barrier()  # every rank has finished writing before any process ends
    return state


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
    data, dev = CaptionSet(prepared, "train"), CaptionSet(prepared, "val")
    decoder = new_decoder(cfg, prepared).to(device)
    if getattr(decoder, "reads_memory", False):
        data.memory = dev.memory = leave_one_out_memory(cfg, prepared, decoder, log)
    if cfg.init_from and cfg.pretrain != "none":
        raise ValueError(f"init_from ({cfg.init_from}) and pretrain ({cfg.pretrain}) both set the decoder's start: "
                         "choose one")
    if cfg.init_from and not resume:  # a resumed run has its own weights in the checkpoint
        init_decoder_from(decoder, cfg.init_from, prepared)
    if cfg.train_added_only:
        if not cfg.init_from:
            raise ValueError("train_added_only keeps the init_from model as it was: set init_from")
        train_added_only(decoder, len(load_model(cfg.init_from).vocab))
    if cfg.pretrain != "none" and not resume:  # a resumed run's decoder, image side included, is in last.pt
        from .contrastive import pretrain_image_side

        pretrain_image_side(cfg, decoder, prepared, device, log)
    return Run(cfg, run_dir, prepared, data, dev, decoder, device, rank, world, features_encoder, log)


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
                                f"{install_hint('train')}")
    if cfg.finetune_epochs:
        missing = [str(prepared.records[i].image) for split in ("train", "val") for i in prepared.indices(split)
                   if not prepared.records[i].image.exists()]
        if missing:
            raise FileNotFoundError(f"stage 2 (finetune_epochs {cfg.finetune_epochs}) reads the images again, and "
                                    f"{len(missing)} are missing, e.g. {missing[0]}; restore them or set "
                                    "--finetune-epochs 0")


def new_decoder(cfg: Config, prepared: Prepared) -> CaptionDecoder:
    """The untrained decoder cfg describes over the prepared folder's vocabulary and features; with
    concept_input or concept_copy (attention-concepts) it gets the ImageNet classifier of the encoder that
    made the features, and each class's caption word in the vocabulary."""
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
    model): the same family (or one the configured family starts_from) and sizes, trained on the same
    features and vocabulary, or on one the prepared vocabulary extends (its words first, in the same order:
    `prepare --extra-vocabulary`), whose new words' rows come from grown_rows. The layers the configured
    family adds to that model (added_weights) keep their initial values: attention-concepts' are zero, so it
    begins as the attention model it starts from."""
    loaded = load_model(path)
    old, new = loaded.vocab.itos, prepared.vocab.itos
    if new[:len(old)] != old:
        raise ValueError(f"init_from {path} was trained with another vocabulary than {prepared.root} (one that "
                         "extends it, its words first, would do)")
    check_encoder_spec(loaded.features_spec, prepared.spec, f"init_from {path} (against {prepared.root})")
    if loaded.decoder.family not in (decoder.family, *decoder.starts_from):
        raise ValueError(f"init_from {path} is a {loaded.decoder.family} decoder, the config asks for {decoder.family}")
    weights = loaded.decoder.state_dict()
    if len(new) > len(old):
        weights.update(grown_rows(weights, old, new))
    try:
        missing, unexpected = decoder.load_state_dict(weights, strict=False)
        if unexpected or any(not key.startswith(decoder.added_weights) for key in missing):
            raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
    except RuntimeError as err:  # other sizes: name the arguments that differ
        theirs, ours = loaded.decoder.arguments(), decoder.arguments()
        differ = [f"{k} {v!r} (model) != {ours.get(k)!r} (config)" for k, v in theirs.items() if ours.get(k) != v]
        raise ValueError(f"init_from {path} does not fit the configured decoder: {'; '.join(differ) or err}") from None


WORD_ROWS = ("embed.weight", "out.weight", "out.bias")  # the LSTM's weights with one row per vocabulary word


def grown_rows(weights: dict[str, Tensor], old: list[str], new: list[str]) -> dict[str, Tensor]:
    """The word rows of a model trained on vocabulary `old`, extended to `new` (old's words first). A new word's
    embedding and output weights are a ridge map of its GloVe vector fitted on the old words' own rows, so
    "giraffe" starts near "zebra"; its output bias is the lowest the model has, as it never wrote the word."""
    from .models.lstm import glove_rows

    names = [key for key in WORD_ROWS if key in weights]
    if not names or any(weights[key].shape[0] != len(old) for key in names):
        raise ValueError(f"init_from: only a model with word rows {', '.join(WORD_ROWS)} can grow its vocabulary")
    vectors, has = glove_rows(new)
    glove = vectors.double()
    fit_rows = torch.nonzero(has[:len(old)]).squeeze(1)  # the old words GloVe has (never the special tokens)
    fresh = glove[len(old):]  # a new word GloVe lacks starts at the map's constant: the mean word
    x = torch.cat([glove[fit_rows], torch.ones(len(fit_rows), 1, dtype=glove.dtype)], dim=1)
    ridge = x.T @ x + 1.0 * torch.eye(x.shape[1], dtype=x.dtype)
    grown = {}
    for key in names:
        rows = weights[key]
        if rows.dim() == 1:
            added = rows.new_full((len(fresh),), float(rows[4:].min()))
        else:
            fit = torch.linalg.solve(ridge, x.T @ rows[fit_rows].double())
            added = (torch.cat([fresh, torch.ones(len(fresh), 1, dtype=fresh.dtype)], dim=1) @ fit).to(rows.dtype)
        grown[key] = torch.cat([rows, added])
    return grown


def train_added_only(decoder: CaptionDecoder, start_words: int) -> None:
    """Keep the init_from model as it was: only the layers the family adds train, and the rows of the words
    after the first start_words (those the start model did not have). SmallCap trains its cross-attention
    alone, and the shipped decoder's self-critical tuning survives."""
    if not decoder.added_weights:
        raise ValueError(f"train_added_only: the {decoder.family} family adds no layers to a model it starts from")
    for name, param in decoder.named_parameters():
        if name.startswith(decoder.added_weights):
            continue
        if name in WORD_ROWS and param.shape[0] > start_words:
            param.register_hook(functools.partial(_rows_from, start=start_words))
        else:
            param.requires_grad_(False)


def _rows_from(grad: Tensor, start: int) -> Tensor:
    """The gradient of the rows from `start` on: the earlier rows stay as they were."""
    grad = grad.clone()
    grad[:start] = 0
    return grad


def leave_one_out_memory(cfg: Config, prepared: Prepared, decoder: CaptionDecoder,
                         log: Callable[[str], None]) -> np.ndarray:
    """Every prepared photo's retrieved captions for a retrieval decoder, found with embedder_from's image
    embedder (the one the trained model carries and caption uses), never the photo's own captions; ranked
    again by the concept words they name (retrieval_concepts) as at inference, where the features have an
    ImageNet head."""
    from .concepts import Concepts
    from .datastore import load_datastore
    from .encoders import pretrained_head

    if not cfg.datastore or not cfg.embedder_from:
        raise ValueError("decoder retrieval needs datastore (a `captioner datastore build` folder) and embedder_from "
                         "(a model folder with retrieval.safetensors)")
    embedder = read_retrieval(Path(cfg.embedder_from))
    if embedder is None:
        raise ValueError(f"embedder_from: {cfg.embedder_from} has no image embedder ({RETRIEVAL_FILE})")
    reader = cast("RetrievalLSTM", decoder)  # decoder retrieval
    head = pretrained_head(prepared.spec) if cfg.retrieval_concepts > 0 else None
    concepts = Concepts(*head, prepared.vocab) if head is not None else None
    return retrieved_memory(prepared, embedder, load_datastore(cfg.datastore), reader, prepared.vocab, leave_out=True,
                            concepts=concepts, concept_weight=cfg.retrieval_concepts, log=log)[0]


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


class LogFile:
    """The run's log lines on the console and appended to train.log in the run folder: what the console
    showed stays with the run, a resumed run's lines after the earlier ones, then how it stopped if it
    failed. Opened at the first line, so a run refused before it logs anything leaves no file; a file that
    cannot be written stops no run."""

    def __init__(self, path: Path, echo: Callable[[str], None]) -> None:
        self.path, self.echo = path, echo
        self.file: TextIO | None = None
        self.broken = False

    def __call__(self, line: str) -> None:
        self.echo(line)
        self.append(line)

    def append(self, line: str) -> None:
        if self.broken:
            return
        try:
            if self.file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a", encoding="utf-8")
            self.file.write(line + "\n")
            self.file.flush()  # a killed run's log is whole up to its last line
        except OSError as err:
            self.broken = True
            self.echo(f"note: {self.path} cannot be written ({err.strerror or err}); the log goes on here only")

    def __enter__(self) -> LogFile:
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, traceback: object) -> None:
        if self.file is None:
            return
        if err is not None:
            self.append(f"stopped: {str(err) or type(err).__name__}")
        with contextlib.suppress(OSError):
            self.file.close()


# ---------------------------------------------------------------- resuming

# What a resumed run may change: how long it runs, where, and where it finds its files; not what it trains.
RESUME_MAY_CHANGE = frozenset({"epochs", "finetune_epochs", "patience", "device", "num_workers", "val_images",
                               "deterministic", "amp", "data", "images", "prepared", "run_dir"})


def check_resumed_config(saved: Config, cfg: Config, run_dir: Path) -> None:
    """A resumed run must go on training what it started; name every option that differs."""
    before = saved.to_dict()
    changed = [f"{key} ({before[key]!r} -> {value!r})" for key, value in cfg.to_dict().items()
               if key not in RESUME_MAY_CHANGE and before.get(key) != value]
    if changed:
        raise ValueError(f"{run_dir} was started with other options: {', '.join(changed)}; resume with the "
                         "run's own options (its config.json) or start a new --run-dir")


def resume_run(run: Run, stage: Stage) -> tuple[TrainState, Stage]:
    """The state and stage of the run in last.pt, with every process's random state where it was."""
    ckpt = load_checkpoint(run.last)
    state = TrainState(**ckpt["train_state"])
    check_resumed_stage(state, run.cfg, run.dir)
    run.decoder.load_state_dict(ckpt["decoder"])
    if ckpt["stage"] == "finetune":
        stage = finetune_stage(run)
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


# ---------------------------------------------------------------- stages

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


def decoder_stage(run: Run) -> Stage:
    """Stage 1: the decoder alone on the cached features, at lr."""
    cfg = run.cfg
    model = wrap_ddp(run.decoder, run.device, run.world)
    optimizer = make_optimizer(cfg.optimizer, run.decoder.parameters(), cfg.lr, cfg.weight_decay)
    steps = len(run.data.batches(cfg.batch_size, 0, run.rank, run.world))
    return Stage("train", model, optimizer, make_scheduler(cfg, optimizer, steps, cfg.epochs),
                 lambda rows: run.data.features(rows).to(run.device, non_blocking=True))


def finetune_stage(run: Run) -> Stage:
    """Stage 2: the encoder the features came from (its fine-tuned weights, when it was fine-tuned before), its
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


def enter_finetuning(run: Run) -> Stage:
    """Stage 2 fine-tunes from the best stage-1 decoder, not the last."""
    if run.world > 1:
        dist.barrier()  # rank 0 writes best/ at the end of stage 1; the others read it here
    if whole_version(run.dir / "best").exists():
        run.decoder.load_state_dict(load_model(run.dir / "best", run.device).decoder.state_dict())
    return finetune_stage(run)


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


def wrap_ddp(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """`module` under DistributedDataParallel when the run has several processes, else itself."""
    if world == 1:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


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


# ---------------------------------------------------------------- epochs

def train_epoch(run: Run, stage: Stage, state: TrainState, objective: Callable) -> tuple[dict, dict, list[dict]]:
    """One epoch of `stage`, then the dev loss and scores: the history row (scores x100, as papers give
    them), the scores (fractions, as coco-caption gives them, with the loss) and every rank's RNG state."""
    cfg = run.cfg
    tf_ratio = teacher_forcing_ratio(cfg, state.epoch)
    batches = run.data.batches(cfg.batch_size, cfg.seed * 1000 + state.epoch, run.rank, run.world)
    start = time.time()
    stats = run_epoch(run, stage, state, objective, batches, tf_ratio)
    seconds = time.time() - start
    scores = {**validate(run.decoder, run.prepared, cfg, run.device, stage.encoder, run.data.memory),
              "loss": dev_loss(run, stage)} if is_main() else {}
    scores, rng = share_scores_and_rng(scores, run.world)
    if isinstance(stage.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        stage.scheduler.step(scores[cfg.val_metric])
    captions = sum(len(run.data.captions_of[i]) for b in batches for i in b) * run.world
    row = {"epoch": state.epoch + 1, "stage": stage.name, **stats, "dev_loss": scores["loss"],
           "dev_Bleu_4": 100 * scores["Bleu_4"], "dev_CIDEr": 100 * scores["CIDEr"], "teacher_forcing": tf_ratio,
           "lr": stage.optimizer.param_groups[0]["lr"], "seconds": round(seconds, 1),
           "captions_per_s": round(captions / seconds, 1), "precision": state.precision}
    return row, scores, rng


def run_epoch(run: Run, stage: Stage, state: TrainState, objective: Callable, batches: list[list[int]],
              tf_ratio: float) -> dict[str, float]:
    """One pass of `stage` over the batches, each a train_step: stage 1 reads cached features, stage 2
    images, which its `augment` may change. Returns the objective's logs averaged over the epoch."""
    cfg, model, scheduler = run.cfg, stage.model, stage.scheduler
    planned = (state.epochs if stage.name == "train" else state.stage_start) + cfg.finetune_epochs
    use_amp = state.precision == "bfloat16"
    model.train()
    totals: dict[str, float] = {}
    bar = tqdm(batches, desc=f"epoch {state.epoch + 1}/{planned} {stage.name}", unit="batch", disable=not is_main(),
               leave=False, mininterval=0.1 if sys.stderr.isatty() else 60)  # a log file gets a line a minute
    for idx in bar:
        batch = run.data.on_device(idx, stage.inputs, run.device, tf_ratio)
        if stage.augment is not None:
            batch = stage.augment(batch)
        logs = train_step(model, objective, stage.optimizer, batch, cfg.grad_clip, use_amp)
        if scheduler is not None and not isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step()  # the per-batch schedules
        for key, value in logs.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        bar.set_postfix(loss=f"{totals['loss'] / totals['n']:.3f}", refresh=False)
    n = max(1.0, totals.pop("n", 0.0))
    return {f"train_{key}": value / n for key, value in totals.items()}


def teacher_forcing_ratio(cfg: Config, epoch: int) -> float:
    """Linear move from teacher_forcing_start to teacher_forcing_end over teacher_forcing_epochs."""
    if cfg.teacher_forcing_epochs <= 0:
        return cfg.teacher_forcing_end
    frac = min(1.0, epoch / cfg.teacher_forcing_epochs)
    return cfg.teacher_forcing_start + frac * (cfg.teacher_forcing_end - cfg.teacher_forcing_start)


def validate(decoder: nn.Module, prepared: Prepared, cfg: Config, device: torch.device,
             encoder: Encoder | None = None, memory: np.ndarray | None = None) -> dict[str, float]:
    """Dev scores of the model as it will caption (its decoding options), at val_beam_size."""
    rows = prepared.indices("val")
    if cfg.val_images:
        rows = rows[: cfg.val_images]
    opts = DecodingOptions(**{**decoding_defaults(cfg), "beam_size": cfg.val_beam_size})
    predictions = decode_split(decoder, prepared, rows, opts, device, encoder, memory=memory)
    return score_captions(predictions, prepared.references(rows), metrics=("Bleu_4", "CIDEr"))


@torch.no_grad()
def dev_loss(run: Run, stage: Stage) -> float:
    """Teacher-forced cross-entropy per word on the dev images validate decodes: the training loss's
    counterpart whatever the objective, so overfitting shows. Under a forked random state, so measuring
    it changes no run's weights."""
    model = getattr(stage.model, "module", stage.model)  # rank 0 alone: without DDP's wrapper
    was_training = model.training
    model.eval()
    images = list(range(len(run.dev.rows)))[: run.cfg.val_images or None]
    per_batch = max(1, round(run.cfg.batch_size * len(run.dev.rows) / len(run.dev)))
    total, words = 0.0, 0
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for start in range(0, len(images), per_batch):
            result = CrossEntropy()(model, run.dev.on_device(images[start:start + per_batch], stage.inputs,
                                                              run.device))
            total, words = total + float(result.logs["loss"]), words + result.n
    model.train(was_training)
    return total / words


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
    run.log(f"epoch {state.epoch}: {train_logs} dev loss {row['dev_loss']:.3f} BLEU-4 {row['dev_Bleu_4']:.1f} "
            f"CIDEr {row['dev_CIDEr']:.1f}{' (best)' if improved else ''} [{row['seconds']:.0f}s, "
            f"{row['captions_per_s']} captions/s]")
    if state.bad_epochs >= cfg.patience:
        run.log(f"early stop: no better dev {cfg.val_metric} for {cfg.patience} epochs")


def write_history(run_dir: Path, history: list[dict]) -> None:
    """metrics.csv and curves.png, rewritten from the full history so a resumed run stays whole, each
    through atomic.replace_file. A run resumed from an older version keeps its earlier rows as they were:
    the columns are those of every row, and curves.png reads each by its name (visualize.curves)."""
    if not history:
        return
    keys = list(dict.fromkeys(key for row in history for key in row))

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, restval="")
            writer.writeheader()
            writer.writerows(history)

    replace_file(run_dir / "metrics.csv", write_csv)
    plot_curves(history, run_dir / "curves.png")
