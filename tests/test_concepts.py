"""The packaged ImageNet class -> caption word table, and concept probabilities from class logits."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from captioner.concepts import (TABLE, concept_probs, concept_vocabulary, load_concept_words, read_concept_words,
                                top_concepts)
from captioner.vocab import tokenize


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
    words = load_concept_words()
    assert words == [row["word"] for row in rows]
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
    assert load_concept_words()[index_of(name)] == word


def test_homographs_are_kept_apart():
    rows = table_rows()
    cranes = {row["word"] for row in rows if row["class"] == "crane"}
    assert cranes == {"bird", "crane"}  # the wading bird and the machine
    assert rows[index_of("Komodo dragon")]["word"] == "lizard"  # a monitor lizard, not a computer monitor


def test_concept_probs_sum_member_classes():
    words, vocabulary = load_concept_words(), concept_vocabulary()
    assert vocabulary == sorted(set(words) - {""})
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
    vocabulary = concept_vocabulary()
    probs = torch.zeros(3, len(vocabulary))
    column = vocabulary.index
    probs[0, [column("cat"), column("dog"), column("bird"), column("fish")]] = torch.tensor([0.3, 0.25, 0.2, 0.15])
    probs[1, column("coffee")] = 0.9
    tops = top_concepts(probs, threshold=0.18, k=3)
    assert [[w for w, _ in row] for row in tops] == [["cat", "dog", "bird"], ["coffee"], []]
    assert tops[0][0] == ("cat", pytest.approx(0.3))
    assert [[w for w, _ in row] for row in top_concepts(probs, threshold=0.1, k=2)] == [["cat", "dog"], ["coffee"], []]
    assert top_concepts(probs) == [[], [("coffee", pytest.approx(0.9))], []]


def test_a_malformed_table_names_file_and_line(tmp_path: Path):
    lines = TABLE.read_text(encoding="utf-8").splitlines()
    bad = tmp_path / "words.tsv"
    bad.write_text("\n".join(lines[:5] + ["4\tn01494475\thammerhead\tbig shark"] + lines[6:]) + "\n")
    with pytest.raises(ValueError, match=r"words\.tsv:6: .*class 4"):
        read_concept_words(bad)
    bad.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"words\.tsv: expected 1000 class rows"):
        read_concept_words(bad)
