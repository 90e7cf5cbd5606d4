"""The Show, Attend and Tell picture: the image, then one panel per word with its attention map."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def attention_overlay(image: Image.Image, alpha: np.ndarray, strength: float = 0.5) -> Image.Image:
    """The image with one word's attention map on top: the map is upsampled bicubically from the encoder's
    grid, scaled to its own maximum (so a word's focus shows even when its weights are spread), coloured jet."""
    from matplotlib import colormaps

    picture = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    grid = Image.fromarray((alpha / max(float(alpha.max()), 1e-8) * 255).astype(np.uint8))
    heat = np.asarray(grid.resize(image.size, Image.Resampling.BICUBIC), dtype=np.float32) / 255
    blended = (1 - strength) * picture + strength * colormaps["jet"](heat)[..., :3]
    return Image.fromarray((blended * 255).round().astype(np.uint8))


def attention_figure(image: Image.Image, words: list[str], alphas: np.ndarray, path: str | Path,
                     columns: int = 5, panel: int = 160) -> Path:
    """Write a PNG: the encoder's view of the image, then each word over its upsampled attention map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
