"""Consensus reranking (consensus.py, decoding.by_consensus): the n-gram similarity, the vote with each
voter leaving itself out, the decoder's lean and the datastore's stored idf. The caption it chooses in the
pipeline, in evaluation and in the REST answer's schema: test_datastore.py, beside its trained model."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from test_datastore import DIM, fake_encoder, write_sources

from captioner.concepts import concept_table
from captioner.consensus import BUCKETS, IDF_STEPS, NGRAM_FILE, count_idf, rerank, similarities
from captioner.datastore import DatastoreError, build, load_datastore
from captioner.decoding import Caption, by_consensus, chosen
from captioner.decoding_options import DecodingOptions
from captioner.vocab import Vocab

FLAT = np.full(BUCKETS, IDF_STEPS, dtype=np.uint8)  # every n-gram weighs 1
COFFEE = ["a cup of coffee on a table", "a cup of coffee on a wooden table", "a cup of coffee and a spoon"]


def test_similarity_is_one_for_the_same_words_zero_for_none_shared_and_between_for_some():
    sims = similarities(["a cup of coffee", "A cup of coffee.", "dogs run", "a cup of tea"], FLAT)
    assert sims[0, 1] == pytest.approx(1.0) and sims[0, 2] == 0.0
    assert 0.0 < sims[0, 3] < 1.0 and sims == pytest.approx(sims.T)


def test_the_voters_outvote_the_decoder_unless_it_leans_far_enough():
    decoded = ["dogs swim"]
    assert rerank(decoded, COFFEE, FLAT, lean=0.0)[0][0] >= len(decoded)  # a voter wins
    best, agreement = rerank(decoded, COFFEE, FLAT, lean=1.0)[0]
    assert best == 0 and agreement == pytest.approx(1.0)  # shares no word with them, but leads by 1
    ranked = rerank(["a cup of coffee on a table"], COFFEE, FLAT, lean=0.0)
    assert len(ranked) == 4 and [a for _, a in ranked] == sorted((a for _, a in ranked), reverse=True)


def test_a_voter_does_not_vote_for_itself():
    # alone in its words, "zebras graze" agrees with no other voter: it scores 0, not 1/3 of itself
    ranked = dict(rerank([], ["zebras graze", "a red bus", "a red bus stops"], FLAT, lean=0.0))
    assert ranked[0] == 0.0 and ranked[1] > 0.0


def test_idf_weighs_an_ngram_in_every_caption_nothing_and_a_rare_one_most():
    idf = count_idf(["a dog", "a cat", "a cat sleeps", "a bird"])
    sims = similarities(["a dog", "a cat"], idf)
    assert sims[0, 1] == 0.0  # "a" is in every caption: no weight
    assert idf.dtype == np.uint8 and idf.shape == (BUCKETS,) and idf.max() == round(np.log(4) * IDF_STEPS)


def test_by_consensus_gives_a_chosen_voter_its_words_and_keeps_the_decoders_scores():
    words = Vocab(["dog", "water", "coffee"])  # ids 4, 5, 6 after the four specials
    decoded = [Caption([4, 5], -1.5, -1.0, True, torch.zeros(2, 0)), Caption([6], -2.5, -2.0, True, torch.zeros(1, 0))]
    opts = DecodingOptions(beam_size=2, num_captions=2, consensus=True, decoder_lean=0.0)
    chosen = by_consensus(decoded, words, COFFEE, FLAT, opts)
    assert chosen[0].text in COFFEE and chosen[0].tokens == [] and chosen[0].agreement > 0
    leaning = by_consensus(decoded, words, COFFEE, FLAT, DecodingOptions(
        beam_size=2, num_captions=2, consensus=True, decoder_lean=1.0))
    # read through the vocabulary, "coffee" shares a word with the voters and "dog water" none
    assert [c.tokens for c in leaning] == [[6], [4, 5]] and leaning[1].score == -1.0 and not leaning[0].text


def test_a_datastore_stores_its_idf_and_counts_it_when_built_before_it(tmp_path):
    store = build(write_sources(tmp_path / "src"), tmp_path / "ds", encoder=fake_encoder, reduced_dim=DIM,
                  log=lambda s: None)
    assert (tmp_path / "ds" / NGRAM_FILE).is_file()
    assert np.array_equal(load_datastore(tmp_path / "ds").idf, count_idf(store.captions))
    (tmp_path / "ds" / NGRAM_FILE).unlink()
    assert np.array_equal(load_datastore(tmp_path / "ds").idf, count_idf(store.captions))
    np.save(tmp_path / "ds" / NGRAM_FILE, np.zeros(10, dtype=np.uint8))
    with pytest.raises(DatastoreError, match=f"{NGRAM_FILE}: expected {BUCKETS} uint8 values"):
        load_datastore(tmp_path / "ds")


def test_the_concept_check_lets_the_voters_choose_where_the_caption_contradicts_the_head():
    words = Vocab(["a", "dog", "in", "the", "water", "coffee", "cup"])
    dog = Caption([4, 5, 6, 7, 8], -1.0, -1.0, True, torch.zeros(5, 0))  # "a dog in the water"
    dog_coffee = Caption([4, 5, 6, 7, 9], -1.5, -1.5, True, torch.zeros(5, 0))  # "a dog in the coffee"
    cup = Caption([4, 10, 6, 7, 8], -2.0, -2.0, True, torch.zeros(5, 0))  # "a cup in the water"
    probs = np.zeros(len(concept_table().vocabulary))
    probs[concept_table().vocabulary.index("coffee")] = 0.95

    class Store:
        idf = FLAT

    opts = DecodingOptions()
    checked = chosen([dog], words, COFFEE, Store(), probs, opts)
    assert checked[0].text in COFFEE and checked[0].agreement > 0  # the dog gave way to a cup of coffee
    assert chosen([dog], words, COFFEE, Store(), probs, DecodingOptions(concept_check=False)) == [dog]
    assert chosen([dog], words, COFFEE, Store(), probs, DecodingOptions(concepts=False)) == [dog]
    assert chosen([dog], words, [], Store(), probs, opts) == [dog]  # nobody to vote: the caption stands
    # with consensus, every beam naming the unseen dog leaves the vote, even one that names the coffee
    lean = DecodingOptions(beam_size=3, num_captions=3, consensus=True, decoder_lean=1.0)
    voted = chosen([dog, dog_coffee, cup], words, COFFEE, Store(), probs, lean)
    assert voted[0].tokens == cup.tokens and all(c.text in COFFEE for c in voted[1:])
    unchecked = chosen([dog, dog_coffee, cup], words, COFFEE, Store(), probs, replace(lean, concept_check=False))
    assert sorted(c.tokens for c in unchecked) == sorted(c.tokens for c in (dog, dog_coffee, cup))
    probs[concept_table().vocabulary.index("dog")] = 0.6  # the head sees the dog: no contradiction
    assert chosen([dog], words, COFFEE, Store(), probs, opts) == [dog]
