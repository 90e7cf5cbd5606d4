"""The familiarity check (familiarity.py): fitted to tell two kinds of photos apart, read from a model folder
(or refused by name), carried by export, and what decoding.chosen does with an unfamiliar photo. Through the
pipeline and evaluate on a trained retrieval model: test_datastore.py."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_consensus import COFFEE, FLAT

from captioner.decoding import Caption, chosen, search_options
from captioner.decoding_options import DecodingOptions
from captioner.familiarity import FAMILIARITY_FILE, Familiarity, fit_familiarity, read_familiarity, unfamiliar_photos
from captioner.vocab import Vocab


def two_kinds(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (n, 8) of two kinds of photo: the other kind is brighter in channel 3, and channel 5
    varies a thousand times more than the rest in both (the standardisation must not let it dominate)."""
    g = torch.Generator().manual_seed(seed)
    familiar, other = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    other[:, 3] += 3.0
    familiar[:, 5] *= 1000
    other[:, 5] *= 1000
    return familiar, other


def test_the_check_learns_which_photos_are_unlike_the_training_photos_from_their_mean_region():
    familiar, other = two_kinds(400, 0)
    check = fit_familiarity(familiar, other, l2=0.01)
    test_familiar, test_other = two_kinds(200, 1)
    # (B, L, C) regions: the check reads their mean, as the ImageNet head does
    regions = test_other[:, None, :] + torch.tensor([[1.0], [-1.0]]) * torch.eye(8)[0]
    p_familiar, p_other = check.unfamiliar(test_familiar[:, None, :]), check.unfamiliar(regions)
    assert (p_familiar < 0.5).mean() > 0.85 and (p_other > 0.5).mean() > 0.85  # the kinds overlap a little
    assert ((p_other > 0.5) == (check.unfamiliar(test_other[:, None, :]) > 0.5)).all()
    assert check.weight.argmax() == 3 and check.weight.dtype == torch.float32
    # a penalty far above what the data says leaves every photo undecided
    assert fit_familiarity(familiar, other, l2=100.0).unfamiliar(test_other[:, None, :]) == pytest.approx(0.5, abs=0.02)
    flags = unfamiliar_photos(check, test_other[:, None, :], 0.5)
    assert flags.dtype == bool and flags.mean() > 0.85
    assert not unfamiliar_photos(None, test_other[:, None, :], 0.5).any()
    certain = Familiarity(torch.zeros(8), torch.tensor(50.0))  # every photo 1.0 in float32
    assert (certain.unfamiliar(test_other[:, None, :]) == 1.0).all()
    assert not unfamiliar_photos(certain, test_other[:, None, :], 1.0).any()  # 1: never, even at 1.0


def test_an_unfamiliar_photo_is_voted_on_with_no_lead_and_a_familiar_one_keeps_the_decoders_caption():
    words = Vocab(["a", "dog", "in", "the", "water"])
    dog = Caption([4, 5, 6, 7, 8], -1.0, -1.0, True, torch.zeros(5, 0))  # "a dog in the water"
    dog2 = Caption([4, 5, 6, 8], -1.2, -1.2, True, torch.zeros(4, 0))

    class Store:
        idf = FLAT

    opts = DecodingOptions(concepts=False, decoder_lean=1.0)  # a lead that keeps the decoder's caption...
    wide = search_options(opts, voting=True)
    assert wide.num_captions == wide.beam_size and search_options(opts).num_captions == 1
    kept = chosen([dog, dog2], words, COFFEE, Store(), None, opts)
    assert kept == [dog]  # widened for another photo's sake, this one still gets num_captions
    voted = chosen([dog, dog2], words, COFFEE, Store(), None, opts, unfamiliar=True)
    assert len(voted) == 1 and voted[0].text in COFFEE and voted[0].agreement > 0  # ...is not given here
    assert chosen([dog, dog2], words, [], Store(), None, opts, unfamiliar=True) == [dog]  # nobody to vote
    asked = replace(opts, consensus=True)  # consensus asked for: every photo is voted on at the lean asked
    beam = chosen([dog, dog2], words, COFFEE, Store(), None, asked, unfamiliar=True)[0]
    assert not beam.text and beam.tokens in (dog.tokens, dog2.tokens)  # the lead of 1 keeps a beam


def test_a_folder_keeps_its_check_through_export_and_one_of_another_width_is_refused(tmp_path):
    from test_retrieval import small_folder

    from captioner.cli import main
    from captioner.models import load_model
    from captioner.models.files import add_familiarity

    folder = small_folder(tmp_path / "model")
    assert load_model(folder).familiarity is None  # a folder without one: no check
    check = Familiarity(torch.linspace(-1, 1, 8), torch.tensor(0.5), {"familiar": "test photos"})
    add_familiarity(folder, check)
    loaded = load_model(folder).familiarity
    assert loaded is not None and torch.equal(loaded.weight, check.weight) and loaded.metadata == check.metadata
    assert main(["export", str(folder), str(tmp_path / "out"), "--unfamiliar-threshold", "0.6"]) == 0
    exported = load_model(tmp_path / "out")
    assert exported.familiarity is not None and torch.equal(exported.familiarity.bias, check.bias)
    assert exported.decoding["unfamiliar_threshold"] == 0.6
    add_familiarity(folder, Familiarity(torch.zeros(16), torch.tensor(0.0)))
    with pytest.raises(ValueError, match=f"{FAMILIARITY_FILE}: not a familiarity check for this model's 8 "):
        read_familiarity(folder, 8)
    assert np.isclose(check.unfamiliar(torch.zeros(1, 2, 8))[0], 1 / (1 + np.exp(-0.5)))
