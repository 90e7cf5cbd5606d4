"""Training objectives: what one batch's loss is. `train.train_step` runs whichever it is given
(autocast, objective, backward, clip, update) and never asks which.

An objective is a callable `(model, batch) -> StepResult`. Its logs are sums over the batch's
`n` units (tokens, samples), so an epoch's figures are totals divided by the total n.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config


@dataclass
class Batch:
    """Whole images with all their captions, as `train.CaptionSet.batch` makes them."""

    inputs: Tensor  # (I, L, C) cached features or (I, 3, S, S) images of the batch's I images
    rows: np.ndarray  # (I,) their rows in the prepared folder
    owner: Tensor  # (B,) index into inputs of each caption's image
    captions: Tensor  # (B, T) `<start> w.. <end> <pad>..`, longest first
    lengths: Tensor  # (B,)
    teacher_forcing: float = 1.0  # scheduled sampling: the probability of feeding the true previous word


@dataclass
class StepResult:
    loss: Tensor  # what backward runs on
    logs: dict[str, Tensor]  # detached sums over the n units of the batch, e.g. {"loss": ..., "top5": ...}
    n: int


@dataclass
class CrossEntropy:
    """Teacher-forced cross-entropy of every next word (with optional label smoothing), plus the
    decoder family's own auxiliary loss. Logs the loss and top-5 accuracy per token."""

    label_smoothing: float = 0.0

    def __call__(self, model: nn.Module, batch: Batch) -> StepResult:
        out = model(batch.inputs, batch.captions, batch.lengths, image_index=batch.owner,
                    teacher_forcing=batch.teacher_forcing)
        logits = out.logits.float()
        ce = F.cross_entropy(logits, out.targets, label_smoothing=self.label_smoothing)
        n = out.targets.numel()
        top5 = (logits.detach().topk(5, dim=1).indices == out.targets.unsqueeze(1)).any(dim=1).sum()
        return StepResult(ce + out.aux_loss.float(), {"loss": ce.detach() * n, "top5": top5}, n)


def make_objective(cfg: Config) -> CrossEntropy:
    """The objective `cfg.objective` names."""
    if cfg.objective == "xe":
        return CrossEntropy(cfg.label_smoothing)
    raise ValueError(f"objective must be xe, not {cfg.objective!r}")
