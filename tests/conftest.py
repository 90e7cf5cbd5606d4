"""Shared fixtures: a tiny Flickr-format dataset written to a temp folder, and the shipped shapes set."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ROOT / "examples" / "shapes"
FLICKR8K = os.environ.get("CAPTIONER_FLICKR8K")

torch.set_num_threads(2)


def write_flickr_dataset(folder: Path, n: int = 12, size: int = 48) -> Path:
    """n coloured-noise images with 2 captions each, split 2/3 train, the rest val and test."""
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines, splits = [], {"train": [], "dev": [], "test": []}
    for i in range(n):
        name = f"img{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(images / name)
        colour = ["red", "green", "blue"][i % 3]
        lines += [f"{name}#0\ta {colour} picture of noise", f"{name}#1\tsome {colour} noise ."]
        splits["train" if i < 2 * n // 3 else "dev" if i % 2 else "test"].append(name)
    (folder / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for kind, names in splits.items():
        (folder / f"Flickr_8k.{kind}Images.txt").write_text("\n".join(names) + "\n")
    return folder


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return write_flickr_dataset(tmp_path / "data")
