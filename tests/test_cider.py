import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from captioner.cider import CiderD
from captioner.vocab import tokenize

from helpers import FLICKR8K

WORDS = "a an the dog dogs cat man woman child ball grass water red blue runs jumps sits plays on in with of".split()


def coco_cider(references: dict[str, list[list[str]]], candidates: dict[str, list[str]]) -> np.ndarray:
    """pycocoevalcap's per-image CIDEr of one candidate per image; its document frequencies come from
    the references of exactly these images."""
    cider = pytest.importorskip("pycocoevalcap.cider.cider")
    gts = {i: [" ".join(r) for r in refs] for i, refs in references.items()}
    res = {i: [" ".join(candidates[i])] for i in references}
    return cider.Cider().compute_score(gts, res)[1]


def sentence(rng: random.Random, low: int = 3, high: int = 12) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(low, high))]


def generated(images: int = 40, seed: int = 0) -> tuple[dict[str, list[list[str]]], list[dict[str, list[str]]]]:
    """References (1 to 6 per image, so images differ in how many they have) and three rounds of one
    candidate per image: a copy or a cut of a reference, another image's reference, or a random sentence;
    some empty, some a single word, some with words no reference uses."""
    rng = random.Random(seed)
    references = {f"img{i}": [sentence(rng) for _ in range(rng.randint(1, 6))] for i in range(images)}
    names = list(references)
    rounds = []
    for r in range(3):
        candidates = {}
        for j, name in enumerate(names):
            kind = (j + r) % 6
            ref = rng.choice(references[name])
            candidates[name] = [ref, ref[: rng.randint(1, len(ref))], rng.choice(references[rng.choice(names)]),
                                sentence(rng, 1, 15), [], [rng.choice(WORDS), "zebra", "zebra", "purple"]][kind]
        rounds.append(candidates)
    return references, rounds


def test_equals_pycocoevalcap_on_generated_captions():
    references, rounds = generated()
    scorer = CiderD(references)
    names = list(references)
    # all rounds in one call: several candidates per image, images interleaved
    ours = scorer.score(names * 3, [c[n] for c in rounds for n in names]).reshape(3, len(names))
    for r, candidates in enumerate(rounds):
        expected = coco_cider(references, candidates)
        assert np.abs(ours[r] - expected).max() < 1e-6
    assert ours.max() > 1.0 and (ours == 0).any()  # the set covers strong matches and no match at all


@pytest.mark.skipif(not FLICKR8K, reason="set CAPTIONER_FLICKR8K to a Flickr8k folder")
def test_equals_pycocoevalcap_on_flickr8k_references():
    references = defaultdict(list)
    for line in (Path(FLICKR8K) / "Flickr8k.token.txt").read_text().splitlines():
        name, caption = line.split("\t")
        references[name.split("#")[0]].append(tokenize(caption))
    names = sorted(references)[:200]
    references = {n: references[n] for n in names}
    assert all(len(r) == 5 for r in references.values())
    rng = random.Random(1)
    # human captions as candidates: of another image, or a left-out reference against the other four
    candidates = {n: rng.choice(references[rng.choice(names)]) if i % 2 else references[n][0]
                  for i, n in enumerate(names)}
    held_out = {n: refs[1:] if i % 2 == 0 else refs for i, (n, refs) in enumerate(references.items())}
    ours = CiderD(held_out).score(names, [candidates[n] for n in names])
    expected = coco_cider(held_out, candidates)
    assert np.abs(ours - expected).max() < 1e-6
    assert ours[0::2].mean() > 5 * ours[1::2].mean()  # an image's own caption scores far higher


def test_token_ids_score_as_the_words_do():
    references, rounds = generated(images=10)
    ids = {w: i for i, w in enumerate(WORDS + ["zebra", "purple"], start=4)}
    as_ids = {n: [[ids[w] for w in r] for r in refs] for n, refs in references.items()}
    names = list(references)
    words = CiderD(references).score(names, [rounds[0][n] for n in names])
    numbers = CiderD(as_ids).score(names, [[ids[w] for w in rounds[0][n]] for n in names])
    np.testing.assert_allclose(numbers, words, rtol=0, atol=1e-12)


def test_a_candidate_scores_the_same_alone_or_in_a_batch():
    references, rounds = generated(images=12)
    scorer = CiderD(references)
    names = list(references)
    batch = scorer.score(names, [rounds[1][n] for n in names])
    alone = [scorer.score([n], [rounds[1][n]])[0] for n in names]
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-12)


def test_document_frequencies_come_from_all_references_given():
    # "dog" is in every image's references of the small set (idf 0: it says nothing), but rare in the big one
    small = {"a": [["a", "dog", "runs"]], "b": [["the", "dog", "sits"]]}
    big = {**small, **{f"x{i}": [["a", "cat", "sleeps"]] for i in range(8)}}
    candidate = [["dog"]]
    assert CiderD(small).score(["a"], candidate)[0] == 0.0
    assert CiderD(big).score(["a"], candidate)[0] > 0.0


def test_bad_input_is_named():
    scorer = CiderD({"a": [["a", "dog"]]})
    with pytest.raises(KeyError, match="'b' is not among the references"):
        scorer.score(["b"], [["a", "dog"]])
    with pytest.raises(TypeError, match="candidate 0 is a string"):
        scorer.score(["a"], ["a dog"])
    with pytest.raises(ValueError, match="2 image ids for 1 candidates"):
        scorer.score(["a", "a"], [["a", "dog"]])
    with pytest.raises(ValueError, match="image 'c' has no references"):
        CiderD({"c": []})
    with pytest.raises(ValueError, match="no words"):
        CiderD({"c": [[]]})
    assert scorer.score([], []).shape == (0,)
