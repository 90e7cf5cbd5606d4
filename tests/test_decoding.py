from __future__ import annotations

import functools
import itertools

import pytest
import torch
from torch import Tensor

from captioner.models import State
from captioner.models.lstm import AttentionLSTM, LSTMArgs, MeanLSTM
from captioner.decoding import Caption, beam_search, greedy

PAD, START, END, UNK = 0, 1, 2, 3
A, B, C, D, E, F, G = range(4, 11)  # the words of the hand-made decoders


def attention_decoder(vocab_size: int = 12, attention: bool = True, seed: int = 9) -> AttentionLSTM:
    """A tiny random decoder with peaked distributions, so that captions end at varied lengths and
    near-ties (which could make equal searches pick different words) are unlikely."""
    torch.manual_seed(seed)
    family = AttentionLSTM if attention else MeanLSTM
    decoder = family(LSTMArgs(context_dim=16, embed_dim=16, attention_dim=16, hidden_dim=16), vocab_size, feature_dim=8).eval()
    with torch.no_grad():
        decoder.out.weight.mul_(4)
    return decoder


def features(batch: int = 3, locations: int = 5, seed: int = 1) -> Tensor:
    return torch.randn(batch, locations, 8, generator=torch.Generator().manual_seed(seed))


class BigramDecoder:
    """A decoder whose next word depends only on the previous one, with probabilities set by hand:
    next_word[w] = {word: probability}; every other word gets a negligible probability."""

    def __init__(self, next_word: dict[int, dict[int, float]], vocab_size: int = 11) -> None:
        probs = torch.full((vocab_size, vocab_size), 1e-9)
        for prev, row in next_word.items():
            for word, p in row.items():
                probs[prev, word] = p
        self.logprobs = (probs / probs.sum(dim=1, keepdim=True)).log()

    def init_state(self, features: Tensor) -> State:
        return {"features": features}

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        batch, locations = state["features"].shape[:2]
        return self.logprobs[words], state, torch.full((batch, locations), 1 / locations)


@torch.no_grad()
def rescore(decoder: AttentionLSTM | BigramDecoder, image: Tensor, tokens: list[int],
            finished: bool) -> tuple[float, Tensor]:
    """Log-probability of a caption for one image (L, C) and the alphas of its words, one word at a time."""
    state = decoder.init_state(image.unsqueeze(0))
    total, alphas = 0.0, []
    for prev, word in zip([START, *tokens], [*tokens, END] if finished else tokens):
        logprobs, state, alpha = decoder.step(torch.tensor([prev]), state)
        total += float(logprobs[0, word])
        alphas.append(alpha[0])
    return total, torch.stack(alphas[: len(tokens)]) if tokens else torch.zeros(0, image.shape[0])


def has_repeated_trigram(tokens: list[int]) -> bool:
    trigrams = list(zip(tokens, tokens[1:], tokens[2:]))
    return len(set(trigrams)) < len(trigrams)


def assert_same(a: Caption, b: Caption) -> None:
    assert a.tokens == b.tokens and a.finished == b.finished
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and a.score == pytest.approx(b.score, abs=1e-5)
    torch.testing.assert_close(a.alphas, b.alphas, atol=1e-5, rtol=0)


def test_beam_size_1_is_greedy() -> None:
    decoder, images = attention_decoder(), features(batch=6)
    found = greedy(decoder, images, max_length=8)
    assert {c.finished for c in found} == {True, False}  # both ways of stopping are covered
    for g, (b,) in zip(found, beam_search(decoder, images, beam_size=1, max_length=8)):
        assert_same(g, b)


def test_beam_search_beats_myopic_greedy() -> None:
    # Greedy takes A (0.6) but then pays for it: A C <end> has probability 0.6 * 0.5 * 0.6 = 0.18,
    # while B <end> has 0.4 * 0.9 = 0.36.
    decoder = BigramDecoder({START: {A: 0.6, B: 0.4}, A: {C: 0.5, END: 0.25, B: 0.25},
                             C: {END: 0.6, D: 0.4}, B: {END: 0.9, C: 0.1}, D: {END: 1.0}})
    images = features(batch=1)
    (g,) = greedy(decoder, images)
    ((b,),) = beam_search(decoder, images, beam_size=2)
    assert g.tokens == [A, C] and b.tokens == [B]
    assert b.logprob == pytest.approx(torch.tensor(0.36).log().item(), abs=1e-5)
    assert g.logprob == pytest.approx(torch.tensor(0.18).log().item(), abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_scores_are_logprobs_over_length_and_sorted(length_penalty: float) -> None:
    decoder, images = attention_decoder(), features()
    results = beam_search(decoder, images, beam_size=4, max_length=8, length_penalty=length_penalty,
                          num_captions=4)
    for image, captions in zip(images, results):
        assert len(captions) == 4
        assert len({tuple(c.tokens) for c in captions}) == 4
        ranks = [(not c.finished, -c.score) for c in captions]  # finished first, then by score
        assert ranks == sorted(ranks)
        for c in captions:
            logprob, alphas = rescore(decoder, image, c.tokens, c.finished)
            assert c.logprob == pytest.approx(logprob, abs=1e-4)
            assert c.score == pytest.approx(c.logprob / (len(c.tokens) + c.finished) ** length_penalty)
            assert c.alphas.dtype == torch.float32 and c.alphas.shape == (len(c.tokens), images.shape[1])
            torch.testing.assert_close(c.alphas, alphas)
            torch.testing.assert_close(c.alphas.sum(dim=1), torch.ones(len(c.tokens)))


@pytest.mark.parametrize("length_penalty", [0.0, 0.7, -0.5])
@pytest.mark.parametrize("num_captions", [3, 30])
def test_a_beam_wider_than_the_search_space_finds_the_best_captions(length_penalty: float,
                                                                   num_captions: int) -> None:
    # Two words and at most 4 of them: 15 finished captions and 16 unfinished ones. A beam of 30 keeps
    # every hypothesis, so the n-best must be exactly the best of all finished captions, however
    # early the search stopped.
    decoder, images = attention_decoder(vocab_size=6), features(batch=2)
    results = beam_search(decoder, images, beam_size=30, max_length=4, length_penalty=length_penalty,
                          num_captions=num_captions)
    for image, captions in zip(images, results):
        every = [list(words) for n in range(4) for words in itertools.product([A, B], repeat=n)]
        scores = [rescore(decoder, image, tokens, True)[0] / (len(tokens) + 1) ** length_penalty
                  for tokens in every]
        best = sorted(zip(scores, every), reverse=True)[:num_captions]
        assert [c.tokens for c in captions if c.finished] == [tokens for _, tokens in best]
        assert [c.score for c in captions if c.finished] == pytest.approx([s for s, _ in best], abs=1e-5)
        assert len(captions) == num_captions  # unfinished captions fill the list up


@pytest.mark.parametrize("length_penalty, next_word, best", [
    # Ranked by mean log-probability, A B C D E F G <end> (-0.48) beats <end> alone (-0.60), but after
    # A B (log 0.45 + log 0.05 = -3.80) it only wins by growing longer, on near-certain words.
    (1.0, {START: {END: 0.55, A: 0.45}, A: {B: 0.05, UNK: 0.95}, B: {C: 0.99}, C: {D: 0.99}, D: {E: 0.99},
           E: {F: 0.99}, F: {G: 0.99}, G: {END: 0.99}}, [A, B, C, D, E, F, G]),
    # With a negative penalty longer captions lose more: A <end> scores 2 log 0.5 = -1.39, <end> -2.30,
    # but A alone would score -5.55 at max_length.
    (-1.0, {START: {END: 0.1, A: 0.5, UNK: 0.4}, A: {END: 1.0}}, [A]),
], ids=["positive", "negative"])
def test_search_goes_on_while_a_live_hypothesis_can_still_win(length_penalty: float,
                                                              next_word: dict[int, dict[int, float]],
                                                              best: list[int]) -> None:
    ((caption,),) = beam_search(BigramDecoder(next_word), features(batch=1), beam_size=2, max_length=8,
                                length_penalty=length_penalty)
    assert caption.tokens == best and caption.finished


def test_batched_results_equal_per_image_results() -> None:
    decoder, images = attention_decoder(), features(batch=3)
    search = functools.partial(beam_search, decoder, beam_size=3, max_length=10, length_penalty=0.5,
                               num_captions=2, block_trigrams=True)
    together = search(images)
    for i in range(3):
        (alone,) = search(images[i : i + 1])
        assert len(alone) == len(together[i]) == 2
        for a, b in zip(alone, together[i]):
            assert_same(a, b)
    for i, caption in enumerate(greedy(decoder, images)):
        assert_same(greedy(decoder, images[i : i + 1])[0], caption)


@pytest.mark.parametrize("kind", ["bigram", "attention"])
def test_without_end_the_best_unfinished_captions_come_back(kind: str) -> None:
    decoder: AttentionLSTM | BigramDecoder
    if kind == "bigram":
        decoder = BigramDecoder({START: {A: 0.6, B: 0.4}, A: {A: 0.3, B: 0.7}, B: {A: 0.55, B: 0.45}})
    else:
        decoder = attention_decoder()
        with torch.no_grad():
            decoder.out.bias[END] = -100.0
    images = features(batch=2)
    for caption in greedy(decoder, images, max_length=6):
        assert not caption.finished and len(caption.tokens) == 6 and caption.alphas.shape == (6, 5)
    for captions in beam_search(decoder, images, beam_size=3, max_length=6, num_captions=3):
        assert len({tuple(c.tokens) for c in captions}) == 3
        assert all(not c.finished and len(c.tokens) == 6 for c in captions)
        assert [c.score for c in captions] == sorted((c.score for c in captions), reverse=True)


def test_trigram_blocking_stops_a_loop() -> None:
    # After B, A (0.6) beats C (0.4, then <end>), so a beam of 1 loops on A B until max_length.
    decoder = BigramDecoder({START: {A: 1.0}, A: {B: 1.0}, B: {A: 0.6, C: 0.4}, C: {END: 1.0}})
    images = features(batch=1)
    ((looping,),) = beam_search(decoder, images, beam_size=1, max_length=8)
    ((blocked,),) = beam_search(decoder, images, beam_size=1, max_length=8, block_trigrams=True)
    assert looping.tokens == [A, B, A, B, A, B, A, B]
    assert blocked.tokens == [A, B, A, B, C] and blocked.finished  # A would repeat A B A
    for captions in beam_search(decoder, images, beam_size=3, max_length=8, length_penalty=1.0,
                                block_trigrams=True, num_captions=3):
        assert not any(has_repeated_trigram(c.tokens) for c in captions)


def test_forbidden_words_never_appear() -> None:
    decoder = BigramDecoder({START: {PAD: 0.3, START: 0.3, UNK: 0.3, A: 0.1}, A: {END: 1.0}, UNK: {END: 1.0}})
    images = features(batch=2)
    assert [c.tokens for c in greedy(decoder, images)] == [[A], [A]]
    assert [c[0].tokens for c in beam_search(decoder, images, beam_size=2)] == [[A], [A]]
    assert greedy(decoder, images, forbid=(PAD, START))[0].tokens == [UNK]
    assert beam_search(decoder, images, beam_size=2, forbid=(PAD, START))[0][0].tokens == [UNK]


def test_decoder_without_attention_gives_empty_alphas() -> None:
    decoder, images = attention_decoder(attention=False), features()
    for caption in greedy(decoder, images, max_length=8):
        assert caption.alphas.shape == (len(caption.tokens), 0)
    for captions in beam_search(decoder, images, beam_size=3, max_length=8, num_captions=2):
        assert [c.alphas.shape for c in captions] == [(len(c.tokens), 0) for c in captions]


def test_num_captions_must_fit_in_the_beam() -> None:
    with pytest.raises(ValueError, match="num_captions"):
        beam_search(attention_decoder(), features(), beam_size=2, num_captions=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_results() -> None:
    decoder, images = attention_decoder(), features()
    on_cpu = beam_search(decoder, images, beam_size=3, max_length=8, num_captions=2)
    on_gpu = beam_search(decoder.cuda(), images.cuda(), beam_size=3, max_length=8, num_captions=2)
    for a, b in zip(itertools.chain(*on_cpu), itertools.chain(*on_gpu)):
        assert_same(a, b)
