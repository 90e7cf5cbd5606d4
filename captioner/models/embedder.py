"""Image vectors in the sentence encoder's space: the pooled head contrastive pretraining trains
(contrastive.py), and the image side + head a model folder may ship beside its decoder (files.py), so
bulk captioning can store each photo's vector and `captioner search` can find photos by their pixels as
well as by their captions."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PooledHead(nn.Module):
    """Regions (B, L, D) -> one L2-normalised embedding per image at the sentence-embedding width: the
    mean over regions, then a linear map. It also holds the learned temperature as log(1/T) (so it
    stays positive and moves multiplicatively), which the loss clamps to 1/T <= 100."""

    def __init__(self, region_dim: int, embed_dim: int, temperature: float = 0.07) -> None:
        super().__init__()
        self.proj = nn.Linear(region_dim, embed_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature)))

    def forward(self, regions: Tensor) -> Tensor:
        return F.normalize(self.proj(regions.mean(dim=1)).float(), dim=-1)


class ImageEmbedder(nn.Module):
    """Encoder features (B, L, C) -> (B, D) unit vectors: a contrastive pretraining's image side (the
    attention decoder's projection, Linear + ReLU) and its pooled head. It reads the features captioning
    already computed, so a photo's vector costs one small matmul, not a second encoder pass.

    `library`: a second pooled head that `captioner adapt` fits to a photo library's pseudo-captions (adapt.py).
    It gives the vectors of the photos the model's familiarity check calls unlike its training photos
    (`unfamiliar`), so retrieval for those follows the library while the photos the decoder knows keep the
    vectors it learned to read."""

    def __init__(self, feature_dim: int, region_dim: int, embed_dim: int, library: bool = False) -> None:
        super().__init__()
        self.image_side = nn.Sequential(nn.Linear(feature_dim, region_dim), nn.ReLU())
        self.head = PooledHead(region_dim, embed_dim)
        self.library = PooledHead(region_dim, embed_dim) if library else None

    def forward(self, features: Tensor, unfamiliar: Tensor | np.ndarray | None = None) -> Tensor:
        regions = self.image_side(features.float())
        vectors = self.head(regions)
        if self.library is not None and unfamiliar is not None and bool(unfamiliar.any()):
            rows = torch.as_tensor(unfamiliar, device=vectors.device)
            vectors = vectors.clone()
            vectors[rows] = self.library(regions[rows])
        return vectors
