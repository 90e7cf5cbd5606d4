"""`captioner adapt` (adapt.py): the embedder's self-training moves photos toward their pseudo-captions, and
what it refuses. The whole command on a trained retrieval model: test_datastore.py, beside that model."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captioner.adapt import adapt, fit_library_head
from captioner.models.embedder import ImageEmbedder


def test_fitting_brings_each_photo_nearer_its_pseudo_caption_through_a_library_head_alone():
    torch.manual_seed(0)
    embedder = ImageEmbedder(12, 16, 8).eval()
    before = {k: v.clone() for k, v in embedder.state_dict().items()}
    rng = np.random.default_rng(0)
    features = rng.normal(size=(32, 4, 12)).astype(np.float16)
    targets = rng.normal(size=(32, 8)).astype(np.float32)
    every = torch.ones(32, dtype=torch.bool)

    def agreement(model: ImageEmbedder, unfamiliar: torch.Tensor | None) -> float:
        with torch.no_grad():
            images = model(torch.from_numpy(features.astype(np.float32)), unfamiliar)
        return float((images * F.normalize(torch.from_numpy(targets), dim=-1)).sum(dim=1).mean())

    fitted = fit_library_head(embedder, features, targets, epochs=20, lr=1e-2, batch_size=8, log=lambda s: None)
    assert fitted.library is not None and not fitted.training
    assert agreement(fitted, every) > agreement(embedder, every) + 0.2
    assert agreement(fitted, ~every) == agreement(embedder, every)  # familiar photos: the vectors they had
    assert all(torch.equal(v, fitted.state_dict()[k]) for k, v in before.items())  # the image side, the head kept
    assert all(torch.equal(v, embedder.state_dict()[k]) for k, v in before.items()) and embedder.library is None


def test_the_library_head_gives_the_unfamiliar_photos_vectors_and_only_theirs():
    torch.manual_seed(0)
    embedder = ImageEmbedder(12, 16, 8, library=True).eval()
    features = torch.randn(3, 4, 12)
    unfamiliar = np.array([False, True, False])
    with torch.no_grad():
        mixed, own = embedder(features, unfamiliar), embedder(features)
        library = embedder.library(embedder.image_side(features))
    torch.testing.assert_close(mixed[[0, 2]], own[[0, 2]])
    torch.testing.assert_close(mixed[1], library[1])
    assert not torch.allclose(mixed[1], own[1])
    plain = ImageEmbedder(12, 16, 8).eval()  # no library head: every photo its own vector
    with torch.no_grad():
        assert torch.equal(plain(features, unfamiliar), plain(features))


def test_adapt_refuses_to_overwrite_its_model_and_an_empty_library(tmp_path):
    with pytest.raises(ValueError, match="is the model itself"):
        adapt(tmp_path / "m", tmp_path, tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no photos in"):
        adapt(tmp_path / "m", tmp_path / "empty", tmp_path / "out")
