from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from captioner.config import Config
from captioner.decoding import Caption, Ensemble, beam_search, greedy, sample
from captioner.decoding_options import DecodingOptions
from captioner.models import DECODERS, State, decoder_class, decoder_from_config
from captioner.models.lstm import AttentionLSTM, LSTMArgs, MeanLSTM

PAD, START, END, UNK = 0, 1, 2, 3
A, B, C, D, E, F, G = range(4, 11)  # the words of the hand-made decoders


def options(**values) -> DecodingOptions:
    """Options as beam search reads them, also past what users may ask for (a beam of 30, a negative
    length penalty): the search itself has no such limits, and its tests go beyond them."""
    opts = DecodingOptions()
    for name, value in values.items():
        object.__setattr__(opts, name, value)
    return opts


def attention_decoder(vocab_size: int = 12, attention: bool = True, seed: int = 9) -> AttentionLSTM:
    """A tiny random decoder with peaked distributions, so that captions end at varied lengths and
    near-ties (which could make equal searches pick different words) are unlikely."""
    torch.manual_seed(seed)
    family = AttentionLSTM if attention else MeanLSTM
    decoder = family(LSTMArgs(context_dim=16, embed_dim=16, attention_dim=16, hidden_dim=16), vocab_size,
                     feature_dim=8).eval()
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
    for g, (b,) in zip(found, beam_search(decoder, images, options(beam_size=1, max_length=8))):
        assert_same(g, b)


def test_beam_search_beats_myopic_greedy() -> None:
    # Greedy takes A (0.6) but then pays for it: A C <end> has probability 0.6 * 0.5 * 0.6 = 0.18,
    # while B <end> has 0.4 * 0.9 = 0.36.
    decoder = BigramDecoder({START: {A: 0.6, B: 0.4}, A: {C: 0.5, END: 0.25, B: 0.25},
                             C: {END: 0.6, D: 0.4}, B: {END: 0.9, C: 0.1}, D: {END: 1.0}})
    images = features(batch=1)
    (g,) = greedy(decoder, images)
    ((b,),) = beam_search(decoder, images, options(beam_size=2))
    assert g.tokens == [A, C] and b.tokens == [B]
    assert b.logprob == pytest.approx(torch.tensor(0.36).log().item(), abs=1e-5)
    assert g.logprob == pytest.approx(torch.tensor(0.18).log().item(), abs=1e-5)


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_scores_are_logprobs_over_length_and_sorted(length_penalty: float) -> None:
    decoder, images = attention_decoder(), features()
    results = beam_search(decoder, images, options(beam_size=4, max_length=8, length_penalty=length_penalty,
                          num_captions=4))
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
    results = beam_search(decoder, images, options(beam_size=30, max_length=4, length_penalty=length_penalty,
                          num_captions=num_captions))
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
    ((caption,),) = beam_search(BigramDecoder(next_word), features(batch=1), options(beam_size=2, max_length=8,
                                length_penalty=length_penalty))
    assert caption.tokens == best and caption.finished


def test_batched_results_equal_per_image_results() -> None:
    decoder, images = attention_decoder(), features(batch=3)
    opts = DecodingOptions(beam_size=3, max_length=10, length_penalty=0.5, num_captions=2, block_trigrams=True)
    together = beam_search(decoder, images, opts)
    for i in range(3):
        (alone,) = beam_search(decoder, images[i : i + 1], opts)
        assert len(alone) == len(together[i]) == 2
        for a, b in zip(alone, together[i]):
            assert_same(a, b)
    for i, caption in enumerate(greedy(decoder, images)):
        assert_same(greedy(decoder, images[i : i + 1])[0], caption)


class PerImageDecoder:
    """Image i (features[i, 0, 0] == i) follows the bigram table tables[i]; records the rows of every step."""

    def __init__(self, *tables: BigramDecoder) -> None:
        self.logprobs = torch.stack([t.logprobs for t in tables])
        self.rows: list[int] = []

    def init_state(self, features: Tensor) -> State:
        return {"image": features[:, 0, 0].long(), "features": features}

    def step(self, words: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        self.rows.append(len(words))
        locations = state["features"].shape[1]
        return self.logprobs[state["image"], words], state, torch.full((len(words), locations), 1 / locations)


@pytest.mark.parametrize("length_penalty", [0.0, 0.5])
def test_a_done_image_leaves_the_batch(length_penalty: float) -> None:
    """Image 0 is sure of "A <end>", image 1 never ends: after image 0 is done only image 1's beams are
    stepped, and both get the captions they get searched alone."""
    short = BigramDecoder({START: {A: 1.0}, A: {END: 1.0}})
    loop = BigramDecoder({START: {A: 0.6, B: 0.4}, A: {A: 0.3, B: 0.7}, B: {A: 0.55, B: 0.45}})
    images = torch.zeros(2, 3, 8)
    images[1, 0, 0] = 1
    opts = options(beam_size=3, max_length=8, length_penalty=length_penalty, block_trigrams=False)
    decoder = PerImageDecoder(short, loop)
    together = beam_search(decoder, images, opts)
    assert decoder.rows[:2] == [2, 6] and set(decoder.rows[2:]) == {3} and len(decoder.rows) == 8
    assert together[0][0].tokens == [A] and together[0][0].finished
    for i, table in enumerate((short, loop)):
        (alone,) = beam_search(table, images[i : i + 1], opts)
        for a, b in zip(alone, together[i]):
            assert_same(a, b)


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
    for captions in beam_search(decoder, images, options(beam_size=3, max_length=6, num_captions=3)):
        assert len({tuple(c.tokens) for c in captions}) == 3
        assert all(not c.finished and len(c.tokens) == 6 for c in captions)
        assert [c.score for c in captions] == sorted((c.score for c in captions), reverse=True)


def test_trigram_blocking_stops_a_loop() -> None:
    # After B, A (0.6) beats C (0.4, then <end>), so a beam of 1 loops on A B until max_length.
    decoder = BigramDecoder({START: {A: 1.0}, A: {B: 1.0}, B: {A: 0.6, C: 0.4}, C: {END: 1.0}})
    images = features(batch=1)
    ((looping,),) = beam_search(decoder, images, options(beam_size=1, max_length=8))
    ((blocked,),) = beam_search(decoder, images, options(beam_size=1, max_length=8, block_trigrams=True))
    assert looping.tokens == [A, B, A, B, A, B, A, B]
    assert blocked.tokens == [A, B, A, B, C] and blocked.finished  # A would repeat A B A
    for captions in beam_search(decoder, images, options(beam_size=3, max_length=8, length_penalty=1.0,
                                block_trigrams=True, num_captions=3)):
        assert not any(has_repeated_trigram(c.tokens) for c in captions)


def test_forbidden_words_never_appear() -> None:
    decoder = BigramDecoder({START: {PAD: 0.3, START: 0.3, UNK: 0.3, A: 0.1}, A: {END: 1.0}, UNK: {END: 1.0}})
    images = features(batch=2)
    assert [c.tokens for c in greedy(decoder, images)] == [[A], [A]]
    assert [c[0].tokens for c in beam_search(decoder, images, options(beam_size=2))] == [[A], [A]]
    assert greedy(decoder, images, forbid=(PAD, START))[0].tokens == [UNK]
    assert beam_search(decoder, images, options(beam_size=2), forbid=(PAD, START))[0][0].tokens == [UNK]


def test_decoder_without_attention_gives_empty_alphas() -> None:
    decoder, images = attention_decoder(attention=False), features()
    for caption in greedy(decoder, images, max_length=8):
        assert caption.alphas.shape == (len(caption.tokens), 0)
    for captions in beam_search(decoder, images, options(beam_size=3, max_length=8, num_captions=2)):
        assert [c.alphas.shape for c in captions] == [(len(c.tokens), 0) for c in captions]


def test_num_captions_must_fit_in_the_beam() -> None:
    with pytest.raises(ValueError, match="num_captions"):
        beam_search(attention_decoder(), features(), options(beam_size=2, num_captions=3))


def test_samples_end_with_end_and_are_masked_after_it() -> None:
    decoder, images = attention_decoder().train(), features(batch=4)
    torch.manual_seed(0)
    tokens, logprobs, lengths = sample(decoder, images, k=5, max_length=8)
    assert tokens.shape == logprobs.shape == (20, int(lengths.max())) and lengths.shape == (20,)
    finished = tokens.gather(1, lengths.unsqueeze(1) - 1).squeeze(1) == END  # or cut at max_length
    assert finished.any() and (lengths[~finished] == 8).all() and not finished.all()
    for row, n in enumerate(lengths.tolist()):
        assert END not in tokens[row, : n - 1].tolist() and PAD not in tokens[row, :n].tolist()
        assert (tokens[row, n:] == PAD).all() and (logprobs[row, n:] == 0).all() and (logprobs[row, :n] < 0).all()


def test_sample_logprobs_are_the_decoders_and_carry_gradients() -> None:
    decoder, images = attention_decoder(), features(batch=3)  # eval: rescoring draws no other dropout mask
    torch.manual_seed(1)
    tokens, logprobs, lengths = sample(decoder, images, k=4, max_length=8)
    for row, n in enumerate(lengths.tolist()):  # row b * k + j belongs to image b
        finished = tokens[row, n - 1] == END
        words = tokens[row, : n - 1 if finished else n].tolist()
        expected, _ = rescore(decoder, images[row // 4], words, bool(finished))
        assert logprobs[row].sum().item() == pytest.approx(expected, abs=1e-4)
    logprobs.sum().backward()
    assert decoder.out.weight.grad is not None and decoder.out.weight.grad.abs().sum() > 0


def test_greedy_sampling_is_greedy_decoding() -> None:
    decoder, images = attention_decoder(), features(batch=6)
    tokens, _, lengths = sample(decoder, images, k=1, max_length=8, greedy=True)
    for row, (caption, n) in enumerate(zip(greedy(decoder, images, max_length=8), lengths.tolist())):
        assert tokens[row, :n].tolist() == caption.tokens + ([END] if caption.finished else [])


def small_decoder(family: str) -> torch.nn.Module:
    """A tiny decoder of the family (dropout at its default), in eval mode."""
    small = dict(context_dim=16, embed_dim=16, attention_dim=16, hidden_dim=16, model_dim=16, transformer_heads=2,
                 transformer_layers=2, encoder_layers=1, ff_dim=32)
    names = set(decoder_class(family).Args.__dataclass_fields__)
    torch.manual_seed(3)
    return decoder_from_config(Config(decoder=family, **{k: v for k, v in small.items() if k in names}), 12, 8).eval()


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_sampling_works_for_every_decoder_family(family: str) -> None:
    decoder = small_decoder(family)
    images = features(batch=3, locations=9)  # a 3 x 3 grid, as the transformer wants
    tokens, logprobs, lengths = sample(decoder, images, k=4, max_length=6)
    for row, n in enumerate(lengths.tolist()):  # the state of image b was repeated for rows 4b..4b+3
        finished = bool(tokens[row, n - 1] == END)
        expected, _ = rescore(decoder, images[row // 4], tokens[row, : n - finished].tolist(), finished)
        assert logprobs[row].sum().item() == pytest.approx(expected, abs=1e-4)
    tokens, _, lengths = sample(decoder, images, k=1, max_length=6, greedy=True)
    for row, (caption, n) in enumerate(zip(greedy(decoder, images, max_length=6), lengths.tolist())):
        assert tokens[row, :n].tolist() == caption.tokens + ([END] if caption.finished else [])


@pytest.mark.parametrize("family", sorted(DECODERS))
def test_every_family_steps_through_its_dropout_in_training_only(family: str) -> None:
    # self-critical training samples through step in train mode: the samples must see the regulariser
    # that teacher-forced training has (the LSTM's step once skipped it, and SCST overfit in an epoch)
    decoder, images = small_decoder(family), features(batch=2, locations=9)
    words = torch.tensor([START, START])

    def step_twice() -> list[Tensor]:
        return [decoder.step(words, decoder.init_state(images))[0] for _ in range(2)]

    first, second = step_twice()
    assert torch.equal(first, second)
    decoder.train()
    first, second = step_twice()
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_samples_follow_the_distribution(temperature: float) -> None:
    # the first word: A, B or C with 0.6 : 0.3 : 0.1 once <unk> (forbidden) is left out, then <end>
    decoder = BigramDecoder({START: {A: 0.45, B: 0.225, C: 0.075, UNK: 0.25}, A: {END: 1}, B: {END: 1}, C: {END: 1}})
    torch.manual_seed(2)
    tokens, logprobs, lengths = sample(decoder, features(batch=2), k=5000, max_length=5, temperature=temperature)
    assert (lengths == 2).all() and (tokens[:, 1] == END).all()
    tempered = torch.tensor([0.6, 0.3, 0.1]) ** (1 / temperature)
    expected = tempered / tempered.sum()
    share = torch.stack([(tokens[:, 0] == w).float().mean() for w in (A, B, C)])
    # a share of 10,000 draws has a standard deviation of at most 0.005: this allows 4 of them
    torch.testing.assert_close(share, expected, atol=0.02, rtol=0)
    # the log-probability is the model's own, not the tempered or renormalised one
    for word, p in ((A, 0.45), (B, 0.225), (C, 0.075)):
        assert logprobs[tokens[:, 0] == word, 0].allclose(torch.tensor(p).log())


def test_sample_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="k and max_length"):
        sample(attention_decoder(), features(), k=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(attention_decoder(), features(), temperature=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gives_the_cpu_results() -> None:
    decoder, images = attention_decoder(), features()
    on_cpu = beam_search(decoder, images, options(beam_size=3, max_length=8, num_captions=2))
    on_gpu = beam_search(decoder.cuda(), images.cuda(), options(beam_size=3, max_length=8, num_captions=2))
    for a, b in zip(itertools.chain(*on_cpu), itertools.chain(*on_gpu)):
        assert_same(a, b)


def test_an_ensemble_averages_the_members_probabilities_word_by_word() -> None:
    one, two = attention_decoder(seed=9), attention_decoder(seed=10)
    ensemble = Ensemble([one, two])
    image = features(batch=1)[0]
    caption = beam_search(ensemble, image.unsqueeze(0), options(beam_size=3))[0][0]
    # the ensemble's log-probability of its caption is, word by word, log((p_one + p_two) / 2)
    with torch.no_grad():
        states = [d.init_state(image.unsqueeze(0)) for d in (one, two)]
        total = 0.0
        for prev, word in zip([START, *caption.tokens], [*caption.tokens, END]):
            steps = [d.step(torch.tensor([prev]), s) for d, s in zip((one, two), states)]
            states = [s for _, s, _ in steps]
            total += float(((steps[0][0][0, word].exp() + steps[1][0][0, word].exp()) / 2).log())
    assert caption.finished and caption.logprob == pytest.approx(total, abs=1e-5)
    assert torch.allclose(caption.alphas.sum(dim=1), torch.ones(len(caption.tokens)))


def test_an_ensemble_of_a_decoder_with_itself_finds_the_decoders_captions() -> None:
    decoder, images = attention_decoder(), features(batch=4)
    alone = beam_search(decoder, images, options(beam_size=3, num_captions=2))
    doubled = beam_search(Ensemble([decoder, decoder]), images, options(beam_size=3, num_captions=2))
    for a, b in zip(itertools.chain(*alone), itertools.chain(*doubled)):
        assert_same(a, b)
    with pytest.raises(ValueError, match="at least 2"):
        Ensemble([decoder])
