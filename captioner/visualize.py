"""Pictures: the Show, Attend and Tell picture (the image, then one panel per word with its attention
map), and a training run's curves."""
from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .atomic import replace_file

# metrics.csv gives the dev scores x100, as papers report them, in dev_* columns; runs before that wrote
# fractions in val_* columns. A column's name says which, never its values (an untrained model scores ~0 either way).
SCALE = {"dev_": 1.0, "val_": 100.0}
TITLES = {"top5": "top-5 accuracy", "Bleu_4": "BLEU-4", "CIDEr": "CIDEr"}


def attention_overlay(image: Image.Image, alpha: np.ndarray, strength: float = 0.5) -> Image.Image:
    """The image with one word's attention map on top: the map is upsampled bicubically from the encoder's
    grid, scaled to its own maximum (so a word's focus shows even when its weights are spread), coloured jet."""
    from matplotlib import colormaps

    picture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    grid = Image.fromarray((alpha / max(float(alpha.max()), 1e-8) * 255).astype(np.uint8))
    heat = np.asarray(grid.resize(image.size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    blended = (1 - strength) * picture + strength * colormaps["jet"](heat)[..., :3]
    return Image.fromarray((blended * 255).round().astype(np.uint8))


NO_ATTENTION = "a caption of a similar photo: no attention"  # what stands for the maps the decoder did not draw


def attention_figure(image: Image.Image, words: list[str], alphas: np.ndarray | None, path: str | Path,
                     columns: int = 5, panel: int = 160) -> Path:
    """Write a PNG: the encoder's view of the image, then each word over its upsampled attention map; with no
    maps (a caption of a similar photo, which the decoder did not write), the image under the caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if alphas is None:
        fig, ax = plt.subplots(figsize=(2 * panel / 80, 2 * panel / 80 + 0.6))
        ax.axis("off")
        ax.imshow(np.asarray(image.convert("RGB")))
        ax.set_title(textwrap.fill(" ".join(words), 40) + f"\n({NO_ATTENTION})",
                     fontsize=10)
        return _save(fig, path)
    n = len(words) + 1
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(columns * panel / 80, rows * panel / 80 + 0.3), squeeze=False)
    picture = np.asarray(image.convert("RGB"))
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(picture)
    axes.flat[0].set_title("(image)", fontsize=10)
    for ax, word, alpha in zip(axes.flat[1:], words, alphas):
        ax.imshow(attention_overlay(image, alpha))
        ax.set_title(word, fontsize=11)
    return _save(fig, path)


def _save(fig: Any, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def curve_of(column: str) -> tuple[str, str, float] | None:
    """(panel, line, scale) of a metrics.csv column: train and dev loss share a panel, each other training
    figure and each dev score has its own; None for what is not plotted (lr, seconds, ...)."""
    if column in ("train_loss", "dev_loss"):
        return "loss", column.removesuffix("_loss"), 1.0
    if column.startswith("train_"):
        name = column.removeprefix("train_")
        return TITLES.get(name, name), "train", 1.0
    for prefix, scale in SCALE.items():
        if column.startswith(prefix):
            name = column.removeprefix(prefix)
            return f"{TITLES.get(name, name)} (dev, x100)", "dev", scale
    return None


def curves(rows: Sequence[Mapping[str, object]]) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """{panel: {line: (epochs, values)}} of metrics.csv's rows, as numbers or as the file's strings; a
    row without a column (a resumed older run's) adds no point to its line."""
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row in rows:
        for column, value in row.items():
            where = curve_of(column)
            if where is None or value is None or value == "":
                continue
            panel, line, scale = where
            epochs, values = panels.setdefault(panel, {}).setdefault(line, ([], []))
            epochs.append(float(str(row["epoch"])))
            values.append(scale * float(str(value)))
    return panels


def plot_curves(rows: Sequence[Mapping[str, object]], path: Path) -> bool:
    """Write curves.png of metrics.csv's rows (through atomic.replace_file); False, writing nothing, without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = curves(rows)
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, (epochs, values) in lines.items():
            ax.plot(epochs, values, marker="o", label=label)
        if len(lines) > 1:
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.ticklabel_format(axis="y", style="plain", useOffset=False)  # 0.0005, not 5e-4 on a 1e-6 axis
        ax.grid(alpha=0.3)
    fig.tight_layout()
    replace_file(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return True
