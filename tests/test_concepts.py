"""The packaged ImageNet class -> caption word table, and concept probabilities from class logits."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner.concepts import (
    N_CLASSES,
    TABLE,
    Concepts,
    concept_probs,
    concept_table,
    contradicts,
    named,
    neighbours,
    read_concept_words,
    read_recall,
    reliably_seen,
    top_concepts,
)
from captioner.decoding import beam_search
from captioner.decoding_options import DecodingOptions
from captioner.vocab import Vocab, tokenize


def table_rows() -> list[dict[str, str]]:
    with TABLE.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def index_of(name: str) -> int:
    """Class index of a class name that occurs once in the table."""
    hits = [int(row["index"]) for row in table_rows() if row["class"] == name]
    assert len(hits) == 1, f"{name!r} names {len(hits)} classes"
    return hits[0]


def test_table_has_the_1000_classes_in_class_index_order():
    rows = table_rows()
    wnids = [row["wnid"] for row in rows]
    assert len(rows) == 1000 and [int(row["index"]) for row in rows] == list(range(1000))
    assert wnids == sorted(set(wnids)) and wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    words = concept_table().words
    assert list(words) == [row["word"] for row in rows]
    assert all(tokenize(word) == [word] for word in words if word)
    assert sum(bool(word) for word in words) > 900


@pytest.mark.parametrize("name, word", [
    ("tabby", "cat"), ("tiger cat", "cat"), ("Persian cat", "cat"), ("espresso", "coffee"),
    ("airliner", "plane"), ("warplane", "plane"), ("mountain bike", "bike"), ("bicycle-built-for-two", "bike"),
    ("Indian elephant", "elephant"), ("African elephant", "elephant"), ("tusker", "elephant"),
    ("sorrel", "horse"), ("golden retriever", "dog"), ("Chihuahua", "dog"), ("canoe", "boat"),
    ("reflex camera", "camera"), ("Polaroid camera", "camera"), ("tripod", "camera"), ("sports car", "car"),
    ("school bus", "bus"), ("pickup", "truck"), ("acoustic guitar", "guitar"), ("park bench", "bench"),
    ("king penguin", "penguin"), ("goldfinch", "bird"), ("cup", "cup"), ("alp", "mountain"),
    ("seashore", "beach"), ("daisy", "flower"), ("plane", ""), ("hip", ""),
])
def test_known_mappings(name: str, word: str):
    assert concept_table().words[index_of(name)] == word


def test_homographs_are_kept_apart():
    rows = table_rows()
    cranes = {row["word"] for row in rows if row["class"] == "crane"}
    assert cranes == {"bird", "crane"}  # the wading bird and the machine
    assert rows[index_of("Komodo dragon")]["word"] == "lizard"  # a monitor lizard, not a computer monitor


def test_concept_probs_sum_member_classes():
    words, vocabulary = concept_table().words, concept_table().vocabulary
    assert list(vocabulary) == sorted(set(words) - {""})
    logits = torch.full((1, 1000), -30.0)
    logits[0, [index_of("tabby"), index_of("tiger cat")]] = 10.0
    probs = concept_probs(logits)
    assert probs.shape == (1, len(vocabulary))
    assert probs[0, vocabulary.index("cat")].item() == pytest.approx(1.0, abs=1e-6)

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 3
    softmax, probs = logits.softmax(dim=1), concept_probs(logits)
    for word in ("cat", "coffee", "dog", "camera"):
        members = [i for i, w in enumerate(words) if w == word]
        torch.testing.assert_close(probs[:, vocabulary.index(word)], softmax[:, members].sum(dim=1))
    wordless = [i for i, w in enumerate(words) if not w]
    torch.testing.assert_close(probs.sum(dim=1), 1 - softmax[:, wordless].sum(dim=1))
    assert (probs.sum(dim=1) <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match="ImageNet logits"):
        concept_probs(torch.zeros(2, 10))


def test_top_concepts_honours_threshold_and_k():
    vocabulary = concept_table().vocabulary
    probs = torch.zeros(3, len(vocabulary))
    column = vocabulary.index
    probs[0, [column("cat"), column("dog"), column("bird"), column("fish")]] = torch.tensor([0.3, 0.25, 0.2, 0.15])
    probs[1, column("coffee")] = 0.9
    tops = top_concepts(probs, threshold=0.18, k=3)
    assert [[w for w, _ in row] for row in tops] == [["cat", "dog", "bird"], ["coffee"], []]
    assert tops[0][0] == ("cat", pytest.approx(0.3))
    assert [[w for w, _ in row] for row in top_concepts(probs, threshold=0.1, k=2)] == [["cat", "dog"], ["coffee"], []]
    assert top_concepts(probs) == [[], [("coffee", pytest.approx(0.9))], []]


def test_a_caption_names_concept_words_plurals_as_their_singular():
    assert named("two dogs chase a cat past the coffee") == {"dog", "cat", "coffee"}
    assert named("a man is sitting on the grass") == set()  # neither is a word the ImageNet head gives


def test_a_caption_contradicts_the_head_when_it_names_the_unseen_and_leaves_out_the_sure():
    column = concept_table().vocabulary.index
    probs = np.zeros(len(concept_table().vocabulary))
    probs[column("coffee")] = 0.95
    assert contradicts("a black dog is playing in the water", probs, 0.3)  # a dog nobody sees, the coffee left out
    assert not contradicts("a dog drinks coffee", probs, 0.3)  # the sure concept is named
    assert not contradicts("a man is playing in the water", probs, 0.3)  # nothing named that the head could see
    # the head rarely sees a bench even where there is one, so its absence says nothing
    assert "bench" not in reliably_seen() and not contradicts("a man sits on a bench", probs, 0.3)
    assert not contradicts("a black dog is playing in the water", probs, 0.99)  # not sure enough
    probs[column("dog")] = 0.2
    assert not contradicts("two dogs in the water", probs, 0.3)  # a dog the head sees a little (0.2 >= 0.1)


def test_the_recall_table_keeps_the_words_the_head_reliably_sees_and_names_a_bad_line(tmp_path: Path):
    table = tmp_path / "recall.tsv"
    table.write_text("word\tphotos\tseen\ndog\t100\t95\nshirt\t900\t9\nheron\t2\t2\n")
    assert read_recall(table) == {"dog"}  # the shirt is rarely seen, the heron too rarely named to tell
    table.write_text("word\tphotos\tseen\ndog\t100\t95\ncat\tmany\t3\n")
    with pytest.raises(ValueError, match=r"recall.tsv:3: expected"):
        read_recall(table)
    assert "dog" in reliably_seen()  # the packaged table (scripts/assets/build_concept_recall.py)


def test_a_malformed_table_names_file_and_line(tmp_path: Path):
    lines = TABLE.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "words.tsv"
    bad.write_text("\n".join(lines[:5] + ["4\tn01494475\thammerhead\tbig shark"] + lines[6:]) + "\n")
    with pytest.raises(ValueError, match=r"words\.tsv:6: .*class 4"):
        read_concept_words(bad)
    bad.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"words\.tsv: expected 1000 class rows"):
        read_concept_words(bad)


# --- decoding with concepts: a hand-made bigram decoder over a five-word vocabulary ---

class Bigram:
    """Next word from the previous one by a fixed table; records what it is fed."""

    def __init__(self, vocab: Vocab, table: dict[str, dict[str, float]]) -> None:
        probs = torch.full((len(vocab), len(vocab)), 1e-6)
        for prev, row in table.items():
            for word, p in row.items():
                probs[vocab.stoi[prev], vocab.stoi[word]] = p
        self.logprobs, self.fed = (probs / probs.sum(dim=1, keepdim=True)).log(), []

    def init_state(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": features}

    def step(self, words: torch.Tensor, state: dict) -> tuple[torch.Tensor, dict, torch.Tensor]:
        self.fed.append(words.tolist())
        return self.logprobs[words], state, torch.zeros(len(words), 0)


WORDS = ["a", "dog", "runs", "camera"]  # "dog" and "camera" are concept words; "cat" is not known
NEXT = {"<start>": {"a": 0.9, "runs": 0.1}, "a": {"dog": 0.7, "camera": 0.3}, "dog": {"runs": 0.9, "<end>": 0.1},
         "camera": {"runs": 0.5, "<end>": 0.5}, "runs": {"<end>": 1.0}}


def concepts_seeing(vocab: Vocab, classes: dict[str, float], channels: int = 4) -> Concepts:
    """Concepts whose head gives the named ImageNet classes these probabilities, whatever the features."""
    bias = torch.full((N_CLASSES,), -30.0)
    rest = 1.0 - sum(classes.values())
    for name, p in classes.items():
        bias[index_of(name)] = math.log(p)
    bias[index_of("abacus")] = math.log(rest) if rest > 0 else -30.0  # somewhere the mass goes
    return Concepts(torch.zeros(N_CLASSES, channels), bias, vocab)


def decode(known: Concepts, decoder: Bigram, **options) -> list[str]:
    opts = DecodingOptions(beam_size=3, max_length=6, num_captions=3, **options)
    base = known.decoder(decoder, opts.concept_threshold) if opts.concepts else decoder
    (captions,) = beam_search(base, torch.zeros(1, 2, 4), opts)
    return [known.vocab.decode(c.tokens) for c in captions]


def test_a_confident_concept_the_model_never_learned_takes_its_neighbours_place():
    vocab = Vocab(WORDS)
    concepts = concepts_seeing(vocab, {"tabby": 0.6, "tiger cat": 0.3})
    assert "cat" in concepts.vocab.stoi and "cat" not in vocab.stoi
    decoder = Bigram(vocab, NEXT)
    assert decode(concepts, decoder, concepts=False)[0] == "a dog runs"
    decoder.fed.clear()
    assert decode(concepts, decoder)[0] == "a cat runs"
    # after writing "cat" the decoder was fed the word it stands in for
    assert any(vocab.stoi["dog"] in step for step in decoder.fed)
    assert all(max(step) < len(vocab) for step in decoder.fed)


def test_an_unconfident_concept_changes_nothing_and_new_words_never_tie_in():
    vocab = Vocab(WORDS)
    concepts = concepts_seeing(vocab, {"tabby": 0.2})  # below the default threshold of 0.3
    decoder = Bigram(vocab, NEXT)
    assert decode(concepts, decoder) == decode(concepts, decoder, concepts=False)
    assert not any("cat" in caption.split() for caption in decode(concepts, decoder))
    assert decode(concepts, decoder, concept_threshold=0.1)[0] == "a cat runs"


def test_a_known_concept_is_favoured_once_and_not_repeated():
    vocab = Vocab(WORDS)
    concepts = concepts_seeing(vocab, {"reflex camera": 0.9})
    table = {**NEXT, "camera": {"a": 0.6, "runs": 0.2, "<end>": 0.2}}  # the model would loop a camera a camera
    decoder = Bigram(vocab, table)
    captions = decode(concepts, decoder)
    assert captions[0].split()[:2] == ["a", "camera"]
    assert all(caption.split().count("camera") <= 1 for caption in captions[:1])


def test_neighbours_are_alike_known_words_nearest_first():
    near = neighbours(["dog", "monkey", "camera", "a"])
    assert near["cat"][0] == "dog" and "camera" not in near["cat"]
    assert near["dog"] == [w for w in near["dog"] if w != "dog"]  # never itself
