from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captioner.cider import CiderD
from captioner.config import Config
from captioner.decoding import sample
from captioner.features import open_prepared, prepare
from captioner.models import decoder_from_config, decoding_defaults, load_model, save_model
from captioner.objectives import Batch, CaptionReward, SelfCritical, advantages, make_objective
from captioner.runtime import make_optimizer
from captioner.train import CaptionSet, train, train_step
from captioner.vocab import Vocab, tokenize

from helpers import SHAPES, needs_java

pytestmark = [needs_java, pytest.mark.filterwarnings("ignore::UserWarning")]
START, END, A, B = 1, 2, 4, 5


class TableDecoder(nn.Module):
    """A decoder whose next word depends only on the previous one, through a learnable logit table."""

    def __init__(self, first: dict[int, float], vocab_size: int = 6) -> None:
        super().__init__()
        table = torch.full((vocab_size, vocab_size), -20.0)
        table[:, END] = 0.0  # after the first word: <end>
        table[START] = -20.0
        for word, p in first.items():
            table[START, word] = float(np.log(p))
        self.table = nn.Parameter(table)

    def init_state(self, features: Tensor) -> dict[str, Tensor]:
        return {"features": features}

    def step(self, words: Tensor, state: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        return F.log_softmax(self.table[words], dim=1), state, state["features"].new_zeros(len(words), 0)

    def first_word_probability(self, word: int) -> float:
        return float(F.softmax(self.table[START], dim=0)[word])


def a_is_right(rows: np.ndarray, tokens: Tensor) -> np.ndarray:
    """Reward 1 for a caption starting with A, 0 for any other."""
    return (tokens[:, 0] == A).double().numpy()


def image_batch(images: int) -> Batch:
    return Batch(torch.zeros(images, 3, 8), np.arange(images), torch.zeros(0, dtype=torch.long),
                 torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long))


def test_mean_baseline_advantages_sum_to_zero_per_image():
    rewards = torch.rand(4, 5, generator=torch.Generator().manual_seed(0))
    found = advantages(rewards)
    torch.testing.assert_close(found.sum(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    for i in range(4):
        for j in range(5):
            others = torch.cat([rewards[i, :j], rewards[i, j + 1:]])
            assert found[i, j] == pytest.approx(float(rewards[i, j] - others.mean()), abs=1e-6)
    greedy = torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(advantages(rewards, greedy), rewards - greedy.unsqueeze(1))


@pytest.mark.parametrize("baseline", ["mean", "greedy"])
def test_a_better_sample_gets_its_logprob_pushed_up(baseline):
    # A and B are about equally likely; greedy takes A, so with the greedy baseline only B loses
    decoder = TableDecoder({A: 0.52, B: 0.48})
    objective = SelfCritical(a_is_right, samples=8, baseline=baseline, max_length=4)
    torch.manual_seed(0)
    result = objective(decoder, image_batch(3))
    assert result.n == 24
    reward = float(result.logs["reward"]) / result.n
    assert 0 < reward < 1  # both kinds were sampled
    if baseline == "greedy":
        assert float(result.logs["greedy_reward"]) / result.n == 1.0 and decoder.training
    result.loss.backward()
    assert decoder.table.grad[START, A] < 0 < decoder.table.grad[START, B]  # descent raises A, lowers B
    before = decoder.first_word_probability(A)
    with torch.no_grad():
        decoder.table -= 0.5 * decoder.table.grad
    assert decoder.first_word_probability(A) > before


def test_the_loss_is_the_advantage_weighted_caption_logprob():
    decoder = TableDecoder({A: 0.3, B: 0.7})
    objective = SelfCritical(a_is_right, samples=4, baseline="mean", max_length=4)
    torch.manual_seed(1)
    result = objective(decoder, image_batch(2))
    torch.manual_seed(1)  # the same samples again
    tokens, logprobs, _ = sample(decoder, torch.zeros(2, 3, 8), 4, 4)
    expected = -(advantages(torch.from_numpy(a_is_right(np.arange(8), tokens)).float().view(2, 4)).view(-1)
                 * logprobs.sum(dim=1)).mean()
    assert float(result.loss) == pytest.approx(float(expected), abs=1e-6)


def test_caption_reward_is_cider_d_of_the_decoded_words():
    vocab = Vocab(["a", "red", "circle", "square", "blue"])
    references = {10: ["A red circle.", "a red circle on the left"], 11: ["a blue square", "blue square"]}
    ids = [[vocab.stoi[w] for w in words] for words in (["a", "red", "circle"], ["blue", "square"], [])]
    tokens = torch.tensor([row + [vocab.end] + [vocab.pad] * (3 - len(row)) for row in ids])
    rows = np.array([10, 10, 11])
    words = {r: [tokenize(c) + ["<end>"] for c in caps] for r, caps in references.items()}
    candidates = [["a", "red", "circle", "<end>"], ["blue", "square", "<end>"], ["<end>"]]
    expected = CiderD(words).score([10, 10, 11], candidates)
    np.testing.assert_allclose(CaptionReward(references, vocab)(rows, tokens), expected, rtol=0, atol=1e-12)
    assert expected[0] > expected[1] == expected[2] == 0.0
    mixed = CaptionReward(references, vocab, bleu_weight=0.5)(rows, tokens)
    assert mixed[0] > expected[0] and mixed[2] == 0.0  # an exact BLEU match adds, an empty caption gets nothing


def test_caption_reward_counts_the_end_of_a_caption_as_a_word():
    # the same words score higher when the caption ended where the references end than when it was
    # cut off at the length limit, and a caption that stops after "a" loses to one that does not
    vocab = Vocab(["a", "dog", "runs", "on", "the", "grass"])
    reward = CaptionReward({0: ["a dog runs on the grass", "a dog runs", "the dog runs on grass"],
                            1: ["a cat sleeps on a bed", "a cat on the bed"]}, vocab)
    def ids(words: list[str], ended: bool) -> list[int]:
        return [vocab.stoi[w] for w in words] + ([vocab.end] if ended else [])
    rows = [ids("a dog runs".split(), True), ids("a dog runs".split(), False), ids("a dog runs on a".split(), True)]
    width = max(map(len, rows))
    tokens = torch.tensor([r + [vocab.pad] * (width - len(r)) for r in rows])
    ended, cut, dangling = reward(np.zeros(3, dtype=int), tokens)
    assert ended > cut and ended > dangling


def test_the_repeat_penalty_takes_its_weight_off_per_repeated_bigram():
    vocab = Vocab(["a", "man", "rides", "bike", "on"])
    references = {0: ["a man rides a bike", "a man on a bike"], 1: ["a man", "a bike"]}
    captions = [["a", "man", "rides", "a", "bike", "on", "a", "bike"], ["a", "man", "rides", "a", "bike"]]
    tokens = torch.tensor([[vocab.stoi[w] for w in c] + [vocab.end] + [vocab.pad] * (8 - len(c)) for c in captions])
    rows = np.zeros(2, dtype=int)
    plain = CaptionReward(references, vocab)(rows, tokens)
    penalised = CaptionReward(references, vocab, repeat_penalty=0.25)(rows, tokens)
    np.testing.assert_allclose(penalised, plain - [0.25, 0.0])  # "a bike" comes twice in the first
    assert penalised[1] > penalised[0]


def test_the_scst_options_are_checked_with_the_config_and_reach_the_objective(shapes):
    prepared = open_prepared(shapes["prepared"])
    with pytest.raises(ValueError, match="option scst_baseline must be one of mean, greedy, got 'max'"):
        Config(objective="scst", scst_baseline="max")
    with pytest.raises(ValueError, match="option scst_samples must be at least 2 with scst_baseline mean, got 1"):
        Config(objective="scst", scst_samples=1)
    assert Config(objective="scst", scst_samples=1, scst_baseline="greedy").scst_samples == 1
    with pytest.raises(ValueError, match="option objective must be one of xe, scst"):
        Config(objective="rl")
    objective = make_objective(Config(objective="scst", scst_samples=3, scst_baseline="greedy"), prepared)
    assert (objective.samples, objective.baseline) == (3, "greedy")


# ---------------------------------------------------------------- on the shapes set

def tiny(prepared: Path, **kw) -> Config:
    values = dict(prepared=str(prepared), batch_size=40, embed_dim=32, attention_dim=32, hidden_dim=32, context_dim=32,
                  max_length=12, lr=3e-3, val_beam_size=1)
    return Config(**{**values, **kw})


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    """The shapes set prepared at 96 px, and a decoder trained on it by cross-entropy for a few steps."""
    root = tmp_path_factory.mktemp("scst")
    prepare(Config(data=str(SHAPES), prepared=str(root / "prepared"), min_count=1, image_size=96), log=lambda s: None)
    prepared = open_prepared(root / "prepared")
    cfg = tiny(root / "prepared")
    torch.manual_seed(0)
    decoder = decoder_from_config(cfg, len(prepared.vocab), prepared.spec["channels"]).train()
    objective, data = make_objective(cfg, prepared), CaptionSet(prepared, "train")
    optimizer = make_optimizer(cfg.optimizer, decoder.parameters(), cfg.lr)
    for epoch in range(6):
        for images in data.batches(cfg.batch_size, epoch):
            rows, owner, captions, lengths = data.batch(images)
            train_step(decoder, objective, optimizer, Batch(data.features(rows), rows, owner, captions, lengths), 5.0)
    save_model(root / "xe", decoder, prepared.vocab, prepared.spec, decoding_defaults(cfg))
    return {"prepared": root / "prepared", "xe": root / "xe"}


def mean_sample_reward(decoder: nn.Module, objective: SelfCritical, data: CaptionSet) -> float:
    torch.manual_seed(123)
    rows = np.array(data.rows)
    with torch.no_grad():
        tokens, _, _ = sample(decoder, data.features(rows), 5, objective.max_length)
    return float(objective.reward(np.repeat(rows, 5), tokens).mean())


def test_scst_steps_raise_the_reward_of_samples_on_the_training_images(shapes):
    prepared = open_prepared(shapes["prepared"])
    cfg = tiny(shapes["prepared"], objective="scst", lr=3e-3)
    objective, data = make_objective(cfg, prepared), CaptionSet(prepared, "train")
    decoder = load_model(shapes["xe"]).decoder.train()
    optimizer = make_optimizer(cfg.optimizer, decoder.parameters(), cfg.lr)
    before = mean_sample_reward(decoder, objective, data)
    torch.manual_seed(0)
    for epoch in range(5):  # 25 steps: +0.09 to +0.18 with seeds 0 to 4 of both trainings
        for images in data.batches(cfg.batch_size, epoch):
            rows, owner, captions, lengths = data.batch(images)
            logs = train_step(decoder, objective, optimizer, Batch(data.features(rows), rows, owner, captions, lengths),
                              5.0)
            assert set(logs) == {"loss", "reward", "n"} and logs["n"] == 5 * len(images)
    after = mean_sample_reward(decoder, objective, data)
    assert after > before + 0.05, (before, after)


def test_scst_xe_weight_adds_the_cross_entropy_of_the_human_captions(shapes):
    prepared = open_prepared(shapes["prepared"])
    data = CaptionSet(prepared, "train")
    rows, owner, captions, lengths = data.batch(data.batches(40, 0)[0])
    batch = Batch(data.features(rows), rows, owner, captions, lengths)
    decoder = load_model(shapes["xe"]).decoder.eval()  # no dropout: the same loss each call
    plain = make_objective(tiny(shapes["prepared"], objective="scst"), prepared)
    mixed = make_objective(tiny(shapes["prepared"], objective="scst", scst_xe_weight=0.3), prepared)
    torch.manual_seed(0)
    without = plain(decoder, batch)
    torch.manual_seed(0)  # the same samples
    with_xe = mixed(decoder, batch)
    xe = make_objective(tiny(shapes["prepared"]), prepared)(decoder, batch)
    assert float(with_xe.loss) == pytest.approx(float(without.loss) + 0.3 * float(xe.loss), abs=1e-5)
    assert float(with_xe.logs["xe"]) / with_xe.n == pytest.approx(float(xe.logs["loss"]) / xe.n, rel=1e-5)
    assert "xe" not in without.logs


@pytest.mark.slow
def test_train_command_runs_scst_from_a_cross_entropy_model(shapes, tmp_path):
    # lr 0: the run's best model is the one it started from, so init_from loaded every weight
    cfg = tiny(shapes["prepared"], objective="scst", init_from=str(shapes["xe"]), epochs=1, lr=0.0,
               scst_baseline="greedy", scst_samples=2, run_dir=str(tmp_path / "run"))
    lines: list[str] = []
    state = train(cfg, log=lines.append)
    assert {"train_loss", "train_reward", "train_greedy_reward", "dev_CIDEr"} <= set(state.history[0])
    # the start was scored as epoch 0, and an epoch that is no better does not replace it as best
    assert any(line.startswith(f"epoch 0 ({shapes['xe']}): dev BLEU-4") for line in lines)
    assert state.best_epoch == 0 and state.history[0]["dev_CIDEr"] == pytest.approx(100 * state.best_score)
    started = load_model(shapes["xe"]).decoder.state_dict()
    best = load_model(tmp_path / "run" / "best").decoder.state_dict()
    assert all(torch.equal(started[k], best[k]) for k in started)


@pytest.mark.slow
def test_init_from_refuses_a_model_that_does_not_fit(shapes, tmp_path):
    cfg = tiny(shapes["prepared"], init_from=str(shapes["xe"]), hidden_dim=16, epochs=1, run_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError,
                       match=r"does not fit the configured decoder: hidden_dim 32 \(model\) != 16 \(config\)"):
        train(cfg, log=lambda s: None)
    both = tiny(shapes["prepared"], init_from=str(shapes["xe"]), pretrain="contrastive", run_dir=str(tmp_path / "run2"))
    with pytest.raises(ValueError, match="init_from .* and pretrain .* choose one"):
        train(both, log=lambda s: None)
