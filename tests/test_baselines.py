import numpy as np
import pytest

from captioner.baselines import _NgramVectors, nearest_neighbour_captions

TOPICS = {
    "dog": ["a {} dog runs on the grass", "a {} dog plays with a ball", "the {} dog jumps over a log"],
    "boat": ["a {} boat sails on the lake", "a {} boat is docked at the pier", "people row a {} boat"],
    "kid": ["a {} child climbs the stairs", "a little {} girl smiles", "a {} boy rides a scooter"],
}
COLOURS = ["brown", "white", "black", "red", "small", "big"]


def clustered(rng, per_topic=12, dim=16):
    """Training images in one feature cluster per topic, each with captions about its topic."""
    centres = rng.normal(size=(len(TOPICS), dim)) * 5
    features, captions, topics = [], [], []
    for centre, (topic, templates) in zip(centres, TOPICS.items()):
        for _ in range(per_topic):
            features.append(centre + rng.normal(size=dim))
            captions.append([t.format(rng.choice(COLOURS)) for t in templates])
            topics.append(topic)
    return np.array(features, dtype=np.float16), captions, topics, centres


def test_returns_a_caption_from_the_query_cluster():
    rng = np.random.default_rng(0)
    features, captions, topics, centres = clustered(rng)
    queries = np.repeat(centres, 4, axis=0) + rng.normal(size=(4 * len(centres), centres.shape[1]))
    chosen = nearest_neighbour_captions(features, captions, queries.astype(np.float16), k=5)
    for caption, topic in zip(chosen, np.repeat(list(TOPICS), 4)):
        owners = {t for caps, t in zip(captions, topics) if caption in caps}
        assert owners == {topic}, caption


def test_consensus_beats_the_nearest_image_outlier():
    train = ["a man rides a red bicycle", "a dog runs on the beach", "a black dog runs on the grass",
             "a dog runs on the grass", "two boats on a lake", "a city street at night"]
    features = np.array([[1, 0.0], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [-1, 0], [0, -1]])
    chosen = nearest_neighbour_captions(features, [[c] for c in train], np.array([[1.0, 0.0]]), k=4)
    assert chosen == ["a dog runs on the grass"]
    # With a single neighbour there is no one to agree with: it is the nearest image's caption.
    assert nearest_neighbour_captions(features, [[c] for c in train], np.array([[1.0, 0.0]]), k=1) == [train[0]]


def test_batched_equals_unbatched():
    rng = np.random.default_rng(1)
    features, captions, _, _ = clustered(rng)
    queries = rng.normal(size=(37, features.shape[1])).astype(np.float32)
    whole = nearest_neighbour_captions(features, captions, queries, k=7, batch_size=1000)
    assert nearest_neighbour_captions(features, captions, queries, k=7, batch_size=5) == whole
    assert len(whole) == 37


def test_consensus_is_the_highest_summed_pairwise_similarity():
    # The linear-time consensus must agree with the quadratic definition on the same vectors.
    rng = np.random.default_rng(2)
    _, captions, _, _ = clustered(rng, per_topic=4)
    vectors = _NgramVectors(captions)
    dense = np.zeros((len(vectors.caption_start) - 1, vectors.size))
    for c, (start, end) in enumerate(zip(vectors.caption_start[:-1], vectors.caption_start[1:])):
        dense[c, vectors.gram[start:end]] = vectors.weight[start:end]
    neighbours = np.array([rng.choice(len(captions), size=5, replace=False) for _ in range(20)])
    for row, chosen in zip(neighbours, vectors.consensus(neighbours)):
        candidates = np.concatenate([np.arange(vectors.image_start[i], vectors.image_start[i + 1]) for i in row])
        similarity = dense[candidates] @ dense[candidates].T
        agreement = similarity.sum(1) - similarity.diagonal()
        assert agreement[list(candidates).index(chosen)] == pytest.approx(agreement.max())


def test_every_training_image_needs_captions():
    with pytest.raises(ValueError):
        nearest_neighbour_captions(np.ones((2, 3)), [["a dog"], []], np.ones((1, 3)))
