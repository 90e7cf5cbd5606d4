"""`captioner lr-find`: the learning-rate range test (Smith 2017).

Raise the rate exponentially batch by batch and watch the loss; a good rate sits a little below where
the loss falls fastest. Runs the training step itself on the training batches, and writes lr_find.png.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .atomic import replace_file
from .batching import CaptionSet
from .config import Config
from .features import open_prepared
from .objectives import make_objective
from .runtime import bf16_supported, make_optimizer, resolve_device, seed_everything
from .step import train_step
from .train import new_decoder


def lr_find(cfg: Config, start_lr: float = 1e-7, end_lr: float = 1.0, steps: int = 100,
            log: Callable[[str], None] = print) -> tuple[list[float], list[float], float]:
    """The rates tried, the smoothed loss at each, and the rate where it fell fastest; stops early once
    the loss diverges (above 4x its lowest)."""
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
    plot(lrs, losses, suggestion, run_dir / "lr_find.png")
    log(f"steepest loss descent at lr {suggestion:.2e} ({len(lrs)} steps); plot: {run_dir / 'lr_find.png'}")
    return lrs, losses, suggestion


def plot(lrs: list[float], losses: list[float], suggestion: float, path: Path) -> None:
    """The loss against the rate on a log axis, the suggestion marked; nothing without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogx(lrs, losses)
    ax.axvline(suggestion, color="red", linestyle="--", label=f"steepest: {suggestion:.1e}")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss (smoothed)")
    ax.legend()
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
