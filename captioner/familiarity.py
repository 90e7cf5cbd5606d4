"""Whether a photo looks like the photos a model learned from: a logistic regression on the encoder's features.

A decoder writes in the world of its training captions (Flickr8k: people, dogs, the outdoors). For a photo
unlike its training photos (a kitchen, a bus), the human captions of similar photos in a retrieval model's
datastore know better, so decoding.chosen lets them vote there (DecodingOptions.unfamiliar_threshold). The
check reads what the ImageNet head reads, the mean of the encoder's regions: one weight per channel and a
bias, fitted to tell the training photos from photos of another kind (scripts/assets/build_familiarity.py:
Flickr8k's against a library of everyday photos). The model folder keeps it in FAMILIARITY_FILE with what it
was fitted on; a folder without one has no check and decodes as before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import Tensor

if TYPE_CHECKING:
    from .encoders import Encoder

FAMILIARITY_FILE = "familiarity.safetensors"


@dataclass
class Familiarity:
    """P(unlike the training photos) = sigmoid(mean of the regions . weight + bias)."""

    weight: Tensor  # (C,) float32, per encoder channel
    bias: Tensor  # () float32
    metadata: dict[str, str] = field(default_factory=dict)  # what it was fitted on, kept in the file

    def unfamiliar(self, features: Tensor) -> np.ndarray:
        """(B, L, C) encoder features -> (B,) probability that each photo is unlike the training photos."""
        pooled = features.float().mean(dim=1)
        return torch.sigmoid(pooled @ self.weight.to(pooled.device) + self.bias.to(pooled.device)).cpu().numpy()


def fit_familiarity(familiar: Tensor, unfamiliar: Tensor, l2: float, steps: int = 200) -> Familiarity:
    """Logistic regression from pooled features (N, C) of the training photos (`familiar`) and of other photos
    (`unfamiliar`): standardised per channel (so that the penalty weighs every channel alike), mean
    cross-entropy plus `l2`/2 times the squared weights, fitted by L-BFGS in float64 (the same features give
    the same check), the standardisation then folded into the weight and bias."""
    x = torch.cat([familiar, unfamiliar]).double()
    y = torch.cat([torch.zeros(len(familiar)), torch.ones(len(unfamiliar))]).double()
    mean, scale = x.mean(0), x.std(0) + 1e-3
    z = (x - mean) / scale
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 / 2 * w.square().sum()
        value.backward()
        return value

    opt.step(loss)
    weight = (w / scale).detach()
    return Familiarity(weight.float(), (b - (mean * weight).sum()).detach().float())


@torch.inference_mode()
def pooled_features(encoder: Encoder, paths: list[Path], size: int | None = None, batch_size: int = 32) -> Tensor:
    """(N, C) mean encoder regions of photos, each first resized to a `size` square (None: as they are): what the
    check reads, for fitting it."""
    from tqdm import tqdm

    from .data import load_image

    out = []
    for start in tqdm(range(0, len(paths), batch_size), desc=f"encoding at {size or 'their size'}", unit="batch",
                      leave=False):
        images = [load_image(p) for p in paths[start:start + batch_size]]
        if size is not None:
            images = [im.resize((size, size), Image.Resampling.BICUBIC) for im in images]
        out.append(encoder.regions(torch.stack([encoder.preprocess(im) for im in images])).float().mean(dim=1))
    return torch.cat(out)


def familiarity_bytes(familiarity: Familiarity) -> bytes:
    """FAMILIARITY_FILE's contents, its metadata (what it was fitted on) with it for whoever reads the folder."""
    from safetensors.torch import save

    return save({"weight": familiarity.weight.contiguous(), "bias": familiarity.bias.reshape(1)},
                familiarity.metadata)


def read_familiarity(folder: Path, channels: int) -> Familiarity | None:
    """The folder's check, or None where it has none; one fitted on features of another width than the model's
    encoder (`channels`) is refused by name."""
    from safetensors import safe_open

    path = folder / FAMILIARITY_FILE
    if not path.exists():
        return None
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if set(tensors) != {"weight", "bias"} or tensors["weight"].shape != (channels,):
        raise ValueError(f"{path}: not a familiarity check for this model's {channels} encoder channels "
                         f"(holds {', '.join(f'{k} {tuple(v.shape)}' for k, v in tensors.items())})")
    return Familiarity(tensors["weight"].float(), tensors["bias"].float().reshape(()), metadata)


def unfamiliar_photos(check: Familiarity | None, features: Tensor, threshold: float) -> np.ndarray:
    """(B,) bools: the photos of (B, L, C) `features` that `check` gives more than `threshold` of being unlike
    the training photos; none without a check."""
    if check is None:
        return np.zeros(len(features), dtype=bool)
    return check.unfamiliar(features) > threshold
