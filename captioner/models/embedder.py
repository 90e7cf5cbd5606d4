"""Image vectors in the sentence encoder's space: the pooled head contrastive pretraining trains
(contrastive.py), and the image side + head a model folder may ship beside its decoder (files.py), so
bulk captioning can store each photo's vector and `captioner search` can find photos by their pixels as
well as by their captions."""
from __future__ import annotations

import math

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
    already computed, so a photo's vector costs one small matmul, not a second encoder pass."""

    def __init__(self, feature_dim: int, region_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.image_side = nn.Sequential(nn.Linear(feature_dim, region_dim), nn.ReLU())
        self.head = PooledHead(region_dim, embed_dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.head(self.image_side(features.float()))
