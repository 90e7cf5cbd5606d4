"""Which precision a run trains in: float32, or bfloat16 autocast where it measures clearly faster.

CPU flags alone mislead: bfloat16 was 1.5x faster on an AMD EPYC and 1.3x slower on an Intel Xeon, both
with native bfloat16, so a run times a few real training steps of each when it starts.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from .config import Config
from .objectives import Batch
from .runtime import bf16_supported, make_optimizer, synchronize
from .step import train_step

PRECISION_STEPS = 2, 3  # warm-up and timed training steps of each precision when a run starts
BFLOAT16_MARGIN = 0.9  # bfloat16 is chosen only when its step takes under 0.9x float32's


def choose_precision(cfg: Config, model: nn.Module, lr: float, objective: Callable,
                     batches: list[list[int]], make_batch: Callable[[list[int]], Batch], device: torch.device,
                     world: int, log: Callable[[str], None]) -> str:
    """float32, or bfloat16 autocast where the config allows it (amp), the device has it, and it measures
    clearly faster: the first few of `batches` trained on copies of `model` (unwrapped) with a new optimizer
    at `lr`, under a forked random state, so the run itself is untouched."""
    if not cfg.amp or not bf16_supported(device):
        return "float32"
    warm, timed = PRECISION_STEPS
    batches = batches[: warm + timed]
    warm = min(warm, len(batches) - 1)  # a tiny train split: fewer warm-up steps, at least one timed
    if warm < 0:
        return "float32"
    seconds = {}
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for precision in ("float32", "bfloat16"):
            trial = copy.deepcopy(model)
            trial_optimizer = make_optimizer(cfg.optimizer, trial.parameters(), lr, cfg.weight_decay)
            for i, rows in enumerate(batches):
                if i == warm:
                    synchronize(device)
                    start = time.perf_counter()
                train_step(trial, objective, trial_optimizer, make_batch(rows), cfg.grad_clip, precision == "bfloat16")
            synchronize(device)
            seconds[precision] = (time.perf_counter() - start) / (len(batches) - warm)
    # a clear margin, so that runs on one machine keep choosing alike (a seed's runs stay bit-identical)
    choice = "bfloat16" if seconds["bfloat16"] < BFLOAT16_MARGIN * seconds["float32"] else "float32"
    if world > 1:  # every rank trains in rank 0's choice
        chosen = [choice]
        dist.broadcast_object_list(chosen, src=0)
        choice = chosen[0]
    log(f"precision: {choice} (a training step took {1000 * seconds['float32']:.0f} ms in float32, "
        f"{1000 * seconds['bfloat16']:.0f} ms under bfloat16 autocast; amp: false keeps float32)")
    return choice
