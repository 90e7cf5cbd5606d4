"""`captioner adapt` (adapt.py): the embedder's self-training moves photos toward their pseudo-captions, and
what it refuses. The whole command on a trained retrieval model: test_datastore.py, beside that model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captioner.adapt import adapt, fit_embedder
from captioner.models.embedder import ImageEmbedder


def test_fitting_brings_each_photo_nearer_its_pseudo_caption_and_leaves_the_original_alone():
    torch.manual_seed(0)
    embedder = ImageEmbedder(12, 16, 8).eval()
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    rng = np.random.default_rng(0)
    features = rng.normal(size=(32, 4, 12)).astype(np.float16)
    targets = rng.normal(size=(32, 8)).astype(np.float32)

    def agreement(model: ImageEmbedder) -> float:
        with torch.no_grad():
            images = model(torch.from_numpy(features.astype(np.float32)))
        return float((images * F.normalize(torch.from_numpy(targets), dim=-1)).sum(dim=1).mean())

    fitted = fit_embedder(embedder, features, targets, epochs=20, lr=1e-2, batch_size=8, log=lambda s: None)
    assert agreement(fitted) > agreement(embedder) + 0.2 and not fitted.training
    assert all(torch.equal(v, embedder.state_dict()[k]) for k, v in before.items())  # trained a copy


def test_adapt_refuses_to_overwrite_its_model_and_an_empty_library(tmp_path):
    with pytest.raises(ValueError, match="is the model itself"):
        adapt(tmp_path / "m", tmp_path, tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no photos in"):
        adapt(tmp_path / "m", tmp_path / "empty", tmp_path / "out")
