"""One optimizer step: the objective under autocast, backward, clipping, update.

Training, the precision measurement and the learning-rate finder all run this one step, so what they
time or plot is what training does.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .objectives import Batch


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
