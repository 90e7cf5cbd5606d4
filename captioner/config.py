"""The one configuration object: every option of prepare, train and decode, read from YAML and flags.

A flat dataclass keeps it greppable: each field is a YAML key and a `--kebab-case` flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .atomic import replace_file
from .decoder_args import (
    CONCEPT_OPTIONS,
    FAMILIES,
    RENAMED,
    ConceptArgs,
    HardAttentionArgs,
    RetrievalArgs,
    TransformerArgs,
    current_family,
    option,
)
from .decoding_options import OPTIONS, DecodingOptions, OptionError, config_field

# The few option spaces the CLI and the validator share. Encoders are a registry (plus timm:NAME), so
# `encoder` is checked where the encoder is built; the others are closed sets known here, without torch.
BACKENDS = ("torch", "onnx")  # what runs a model: PyTorch, or onnxruntime on an exported folder
FITS = ("crop", "squash")  # how a photo that is not square meets the encoder (encoders.fit_photo)
FORMATS = ("auto", "flickr", "kaggle", "karpathy", "coco", "custom")
VAL_METRICS = ("Bleu_4", "CIDEr")  # what per-epoch validation computes (METEOR's JVM is too slow per epoch)
UNUSED = ("num_workers",)  # fields old config files may hold, which nothing reads
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class _Inputs:
    """The options before the decoder's: Config's first fields, so its flags keep this order in --help."""

    # data
    data: str = option("", "dataset folder or annotation file, as given to `prepare`")
    format: str = option("auto", "dataset format; auto detects it from the files", choices=FORMATS)
    images: str = option("", "image folder, when it is not found next to the annotations")
    prepared: str = option("prepared", "folder made by `prepare`: records, vocabulary, feature cache")
    skip_missing: bool = option(False, "drop records whose image file is missing instead of failing")
    holdout_words: str = option("", "comma-separated words: train images whose captions mention any of them are "
                                    "left out, so the model never learns those words (novel-object evaluation)")
    split_file: str = option("", "Karpathy's split file (dataset_coco.json, dataset_flickr30k.json) whose "
                                 "train/val/test splits prepare uses; empty: such a file beside the annotations, "
                                 "else their own splits or a fixed rule (the summary says which)")
    max_images: int = option(0, "prepare: keep only the first N images, 80% of them train and 10% each val and "
                                "test (the first of each split), for a quick first run; 0: all", range=(0, None))

    # vocabulary
    min_count: int = option(5, "words seen fewer times in the train split become <unk>", range=(1, None))
    extra_vocabulary: str = option("", "comma-separated caption files (any format prepare reads) whose words, seen "
                                       "extra_min_count times, join the vocabulary with every concept word: what a "
                                       "retrieval decoder may copy")
    extra_min_count: int = option(20, "how often a word of extra_vocabulary must occur to join", range=(1, None))
    max_caption_length: int = option(50, "tokens kept per caption (without <start>/<end>)", range=(1, None))

    # encoder
    encoder: str = option("efficientnet_lite0", "efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, "
                                                "or timm:MODEL where timm imports")
    image_size: int = option(0, "input side in pixels; 0: the encoder's native resolution", range=(0, None))
    feature_layer: str = option("head", "which feature map attention looks at", choices=("head", "stage6", "stage5"))
    fit: str = option("crop", "how the trained model meets a photo that is not square: crop (the encoder's centre "
                              "crop, as prepare reads training photos) or squash (first resized to a square, its "
                              "aspect not kept: for training photos made square that way, as Flickr8k's 224 x 224 "
                              "copies here were); stored in the model", choices=FITS)
    prepare_batch_size: int = option(32, "images per encoder pass in `prepare`", range=(1, None))
    encoder_from: str = option("", "prepare: a model folder whose fine-tuned encoder (stage 2) extracts the "
                                   "features, so self-critical training can follow fine-tuning; empty: the "
                                   "pretrained encoder")

    # decoder: which family; its architecture arguments are the fields Config inherits from the families' Args
    decoder: str = option("attention", "; ".join(f"{name}: {about}" for name, (_, about) in FAMILIES.items()),
                          choices=tuple(FAMILIES))


@dataclass
class Config(TransformerArgs, RetrievalArgs, HardAttentionArgs, ConceptArgs, _Inputs):
    """Every option. The families' Args are bases (decoder_args.py), so each architecture argument is declared
    once; tests/test_config.py checks that every family's Args is one."""

    # retrieval training: where the memory comes from (not architecture: the model folder carries it)
    datastore: str = option("", "retrieval: the caption datastore (`captioner datastore build`) training retrieves "
                                "from, leaving each photo's own captions out; the model folder carries a copy")
    embedder_from: str = option("", "retrieval: the model folder whose image embedder (retrieval.safetensors) "
                                    "finds a photo's neighbours; the trained model carries it")

    # objective
    objective: str = option("xe", "training loss; xe: teacher-forced cross-entropy (plus the decoder's own "
                                  "penalty); scst: self-critical sequence training on CIDEr-D",
                            choices=("xe", "scst"))
    label_smoothing: float = option(0.0, "cross-entropy against (1 - eps) one-hot + eps uniform", range=(0.0, 1.0))
    init_from: str = option("", "model folder whose decoder weights training starts from (scst: a cross-entropy "
                                "model)")
    train_added_only: bool = option(False, "init_from: train only the layers the decoder family adds to that model "
                                           "and the rows of the words it did not have; the rest stays as it was")
    scst_samples: int = option(5, "scst: captions sampled per image (at least 2 with the mean baseline)",
                               range=(1, None))
    scst_baseline: str = option("mean", "scst: mean of the image's other samples, or the greedy caption's reward",
                                choices=("mean", "greedy"))
    scst_bleu_weight: float = option(0.0, "scst: reward = CIDEr-D + this x sentence BLEU-4", range=(0.0, None))
    scst_max_length: int = option(16, "scst: words sampled at most, <end> included", range=(1, None))
    scst_repeat_penalty: float = option(0.0, "scst: subtracted from the reward once per repeated word bigram of "
                                        "a sample (CIDEr-D alone rewards 'riding a bike on a bike')", range=(0.0, None))
    scst_xe_weight: float = option(0.0, "scst: loss = policy gradient + this x the cross-entropy of the batch's "
                                   "human captions, which keeps the words fluent", range=(0.0, None))

    # contrastive pretraining of the decoder's image side (contrastive.py), before caption training
    pretrain: str = option("none", "contrastive: InfoNCE of the image side against MiniLM sentence embeddings "
                                   "of the captions, before caption training", choices=("none", "contrastive"))
    pretrain_epochs: int = option(5, "pretraining epochs (Flickr8k: the dev recall peaks at epoch 4-5)",
                                  range=(1, None))
    pretrain_lr: float = option(1e-3, "pretraining learning rate", range=(0.0, None))
    pretrain_batch_size: int = option(256, "pretraining images per batch, with all their captions (more "
                                           "negatives help InfoNCE)", range=(1, None))

    # training
    run_dir: str = option("runs/default", "folder for checkpoints, the best model, metrics, curves and train.log "
                                          "(the console's lines)")
    seed: int = option(0, "seed of initialisation, dropout, scheduled sampling and batch order",
                       range=(0, 2**32 - 1))
    deterministic: bool = option(True, "bit-identical runs for a seed (deterministic kernels; on CUDA also "
                                       "CUBLAS_WORKSPACE_CONFIG=:4096:8)")
    device: str = option("auto", "auto (CUDA when present), cpu, cuda, cuda:N or mps")
    epochs: int = option(20, "stage 1 epochs, on cached features with the encoder frozen", range=(0, None))
    batch_size: int = option(80, "captions per batch (whole images with all their captions)", range=(1, None))
    optimizer: str = option("adam", "optimizer", choices=("adam", "adamw", "rmsprop"))
    lr: float = option(4e-4, "stage 1 learning rate (the peak rate under onecycle)", range=(0.0, None))
    weight_decay: float = option(0.0, "weight decay", range=(0.0, None))
    grad_clip: float = option(5.0, "clip the gradient norm to this; 0: no clipping", range=(0.0, None))
    schedule: str = option("plateau", "plateau: halve the rate when the dev score stalls; onecycle: one cycle "
                                      "over stage 1 (fixes its length); warmup: linear warm-up, then 1/sqrt(step); "
                                      "none", choices=("plateau", "onecycle", "warmup", "none"))
    warmup_steps: int = option(1000, "batches of linear warm-up for schedule warmup", range=(1, None))
    teacher_forcing_start: float = option(1.0, "scheduled sampling: probability of feeding the true previous "
                                               "word at the start", range=(0.0, 1.0))
    teacher_forcing_end: float = option(1.0, "the same probability at the end of the move", range=(0.0, 1.0))
    teacher_forcing_epochs: int = option(10, "epochs over which it moves linearly from start to end",
                                         range=(0, None))
    patience: int = option(5, "epochs without a better dev score before stopping (or moving on to stage 2)",
                           range=(1, None))
    val_metric: str = option("CIDEr", "dev score that picks the best model and drives plateau and early "
                                      "stopping", choices=VAL_METRICS)
    val_beam_size: int = option(1, "beam size of the per-epoch dev decoding", range=(1, 20))
    val_images: int = option(0, "dev images decoded per epoch; 0: the whole dev split", range=(0, None))
    finetune_epochs: int = option(0, "stage 2 epochs on images with the top encoder blocks trainable",
                                  range=(0, None))
    finetune_blocks: int = option(2, "encoder blocks trained in stage 2", range=(0, None))
    finetune_lr: float = option(1e-4, "stage 2 learning rate", range=(0.0, None))
    finetune_mirror: bool = option(True, "stage 2: mirror each image with probability 1/2 and swap 'left' and "
                                         "'right' in its captions, so that they still describe it")
    num_workers: int = option(0, "unused (batches come from the in-memory feature cache); kept so older "
                                 "config files load, and not offered as a flag", range=(0, None))
    amp: bool = option(True, "allow bfloat16 autocast in training: used where the device has native bfloat16 "
                             "and a few training steps of each precision, timed when the run starts, find it "
                             "faster (logged, in metrics.csv, kept on resume); false: float32")

    # decoding (the defaults a trained model keeps for caption, serve and evaluate): decoding_options.py's table
    beam_size: int = config_field("beam_size")
    max_length: int = config_field("max_length")
    length_penalty: float = config_field("length_penalty")
    block_trigrams: bool = config_field("block_trigrams")
    num_captions: int = config_field("num_captions")
    concepts: bool = config_field("concepts")
    concept_threshold: float = config_field("concept_threshold")
    retrieval: bool = config_field("retrieval")
    retrieved: int = config_field("retrieved")
    retrieval_concepts: float = config_field("retrieval_concepts")
    consensus: bool = config_field("consensus")
    concept_check: bool = config_field("concept_check")
    decoder_lean: float = config_field("decoder_lean")
    unfamiliar_threshold: float = config_field("unfamiliar_threshold")

    def __post_init__(self) -> None:
        """Every value is checked when a Config is made (from a file, flags or code), not where it is
        first used, so a bad option fails before any work."""
        for f in fields(self):
            setattr(self, f.name, _checked(f, getattr(self, f.name)))
        self.decoder = current_family(self.decoder, {name: getattr(self, name) for name in CONCEPT_OPTIONS})
        for name in CONCEPT_OPTIONS:
            if getattr(self, name) and self.decoder != "attention-concepts":
                raise ValueError(f"{name} is an option of the attention-concepts decoder, not of {self.decoder!r}")
        try:
            DecodingOptions(**{name: getattr(self, name) for name in OPTIONS})
        except OptionError as err:
            raise ValueError(f"option {err}") from None
        if self.scst_baseline == "mean" and self.scst_samples < 2:  # the mean of the *other* samples
            raise ValueError(f"option scst_samples must be at least 2 with scst_baseline mean, got {self.scst_samples}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        replace_file(path, lambda tmp: tmp.write_text(text))  # a resumed run reads it back

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> Config:
        values = renamed_options(values)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    @classmethod
    def load(cls, path: str | Path) -> Config:
        """Read a YAML or JSON file of options (a flat mapping). `base: OTHER.yaml` (a path relative to
        the file) reads that file's options first and lets this one override them, so a variant of a
        recipe states only how it differs."""
        return cls.from_dict(_read_options(Path(path), ()), source=str(path))


def _read_options(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """The options of a config file with its `base` chain folded in. Each file's options are checked
    against the fields here, so an error names the file that holds the bad line."""
    if path.resolve() in chain:
        raise ValueError(f"{path}: base files form a loop: {' -> '.join(map(str, (*chain, path.resolve())))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from None
    except OSError as err:
        raise ValueError(f"{path}{f' (the base of {chain[-1]})' if chain else ''}: {err.strerror}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    base = values.pop("base", None)
    values = renamed_options(values)
    known = {f.name: f for f in fields(Config)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}")
    try:
        values = {k: _checked(known[k], v) for k, v in values.items()}
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    if base is None:
        return values
    if not isinstance(base, str):
        raise ValueError(f"{path}: base must be the path of another config file, got {base!r}")
    return {**_read_options(path.parent / base, (*chain, path.resolve())), **values}


def renamed_options(values: dict[str, Any]) -> dict[str, Any]:
    """An older config's options under today's names. A renamed name that no field has any more maps
    wherever it appears; one that is another family's field (the LSTMs' dropout) maps only in a config that
    names the renamed family as its decoder and does not give the new name too."""
    names = {f.name for f in fields(Config)}
    out = dict(values)
    for family, renamed in RENAMED.items():
        for old, new in renamed.items():
            if old in out and (old not in names or (out.get("decoder") == family and new not in out)):
                value = out.pop(old)
                out.setdefault(new, value)
    return out


def _checked(f: dataclasses.Field, value: Any) -> Any:
    """`value` as field `f` takes it (an int where a float goes becomes a float), or a ValueError that names
    the option and what it accepts."""
    kind = type(f.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"option {f.name} must be {kind.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ValueError(f"option {f.name} must be one of {', '.join(choices)}, got {value!r}")
    low, high = f.metadata.get("range", (None, None))
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"option {f.name} must be {_describe_range(low, high)}, got {value!r}")
    if f.name == "device" and not _DEVICE.fullmatch(str(value)):
        raise ValueError(f"option device must be auto, cpu, mps, cuda or cuda:N, got {value!r}")
    return value


def _describe_range(low: float | None, high: float | None) -> str:
    if high is None:
        return f"at least {low:g}"
    if low is None:
        return f"at most {high:g}"
    return f"from {low:g} to {high:g}"


def add_config_flags(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add `--config FILE` and one flag per Config field (all fields, or just `names`), each with the
    field's help, choices or range, and default."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of options; flags given here override it")
    for f in fields(Config):
        if (names is None or f.name in names) and f.name not in UNUSED:
            add_field_flag(parser, f, repr(f.default))


def add_decoding_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] = tuple(OPTIONS),
                       default: str = "the model's own") -> None:
    """The flags of the decoding options in `names` (their Config fields, made from decoding_options.py's
    table) for commands that run a trained model: what the user does not give falls back to `default`."""
    for f in fields(Config):
        if f.name in names:
            add_field_flag(parser, f, default)


def add_field_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, default: str) -> None:
    """`--kebab-case` for field `f`, with its help, choices or range, and what applies when it is not
    given. Its value is None then, so it leaves the config file's or the model's value alone."""
    text = f.metadata["help"]
    if "range" in f.metadata:
        text += f"; {_describe_range(*f.metadata['range'])}"
    text = f"{text} (default: {default})".replace("%", "%%")  # argparse formats help with %
    flag = "--" + f.name.replace("_", "-")
    if isinstance(f.default, bool):
        parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
    else:
        kind = type(f.default)
        parser.add_argument(flag, dest=f.name, type=kind, default=None, choices=f.metadata.get("choices"),
                            metavar=None if "choices" in f.metadata else kind.__name__.upper(), help=text)


def flags_given(args: argparse.Namespace, names: tuple[str, ...] = tuple(OPTIONS)) -> dict[str, Any]:
    """The decoding options among `names` that the user gave as flags."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the --config file, then every flag the user actually gave."""
    cfg = Config.load(args.config) if getattr(args, "config", None) else Config()
    from_flags = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    try:
        return dataclasses.replace(cfg, **from_flags)
    except ValueError as err:
        raise ValueError(f"{args.config + ' with ' if args.config else ''}the flags given: {err}") from None
