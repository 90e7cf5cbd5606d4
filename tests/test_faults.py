"""Fault injection: real `captioner train` and `captioner prepare` processes killed with SIGKILL at named
points, then run again; a full disk and a read-only run folder; the atomic writes they rely on.

A child is killed by patching one function in it (helpers.KILLER: the Nth call that meets a condition
SIGKILLs its own process, before or after the real call), so the product code carries no hook.
docs/RELIABILITY.md records what this suite covers.
"""
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from captioner import atomic
from captioner import train as train_mod
from captioner.cli import main
from captioner.config import Config
from captioner.features import DONE, prepare
from captioner.models import load_model

from helpers import ROOT, killer_command, needs_java, prepare_tiny_flickr, write_flickr_dataset

pytestmark = [needs_java, pytest.mark.filterwarnings("ignore::UserWarning")]

def run_cli(*argv: str, kill: tuple[str, str, int, str] | None = None) -> subprocess.CompletedProcess:
    """`captioner ARGV` in a child process, SIGKILLed at the point `kill` names (see helpers.killer_command)."""
    cmd = [sys.executable, "-m", "captioner.cli", *argv] if kill is None else killer_command(kill, *argv)
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)


def checkpoint(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=True)  # also: a checkpoint loads without pickled code


def trained_tensors(run: Path) -> dict[str, torch.Tensor]:
    ckpt = checkpoint(run)
    out = {f"decoder.{k}": v for k, v in ckpt["decoder"].items()}
    out.update({f"encoder.{k}": v for k, v in (ckpt["encoder"] or {}).items()})
    for i, state in ckpt["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return out


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that differ (all of them if the names differ)."""
    if a.keys() != b.keys():
        return sorted(set(a) ^ set(b))
    return [k for k in a if not torch.equal(a[k], b[k])]


# ---------------------------------------------------------------- train

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return prepare_tiny_flickr(tmp_path_factory.mktemp("faults"))


def train_args(prepared: Path, run: Path) -> list[str]:
    """Two epochs of stage 1 (five batches each) and one of stage 2, with scheduled sampling."""
    return ["train", "--prepared", str(prepared), "--run-dir", str(run), "--epochs", "2", "--finetune-epochs", "1",
            "--finetune-blocks", "1", "--batch-size", "4", "--embed-dim", "16", "--attention-dim", "16",
            "--hidden-dim", "16", "--context-dim", "16", "--dropout", "0.3", "--max-length", "8", "--lr", "3e-3",
            "--teacher-forcing-end", "0.7", "--teacher-forcing-epochs", "2", "--no-amp"]


# (what is interrupted, the command, the kill, the epoch last.pt holds afterwards), in the order a run meets
# them. The swap of best/ is killed in `captioner export RUN/best RUN/best`, which rewrites the folder in
# place through the same save_model as training: training itself rewrites best/ only when the dev score
# improves, which a tiny dev set does not promise at any given epoch. The next run then finds best.old/
# only, reads it at the start of stage 2, and replaces it if its score improves.
SWAP = "os.path.basename(str(args[1])) == 'best' and os.path.exists(str(args[1]) + '.old')"
TRAIN_KILLS = [
    ("mid-epoch (stage 1, epoch 2, batch 2)", "train", ("captioner.train:train_step", "True", 7, "before"), 1),
    ("during validation (epoch 2)", "resume", ("captioner.train:score_captions", "True", 1, "before"), 1),
    ("while the checkpoint is written (epoch 2)", "resume",
     ("pathlib:Path.write_bytes", "str(args[0]).endswith('last.pt.tmp')", 1, "half"), 1),
    ("between the two renames that swap in a new best/", "export", ("os:replace", SWAP, 1, "before"), 1),
    ("mid-epoch in stage 2 (epoch 3, batch 2)", "resume",
     ("captioner.train:train_step", "args[3].inputs.dim() == 4", 2, "before"), 2),
]


@pytest.mark.slow
@pytest.mark.cli
def test_killed_training_resumes_to_the_weights_of_an_uninterrupted_run(prepared, tmp_path):
    """One run killed at each point in turn (each `--resume` goes on until the next kill), then finished:
    its weights, optimizer state, history and best model equal those of a run never interrupted."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    result = run_cli(*train_args(prepared, whole))
    assert result.returncode == 0, result.stderr[-3000:]
    history = checkpoint(whole)["train_state"]["history"]
    assert [h["stage"] for h in history] == ["train", "train", "finetune"]

    commands = {"train": train_args(prepared, cut), "resume": train_args(prepared, cut) + ["--resume"],
                "export": ["export", str(cut / "best"), str(cut / "best"), "--dtype", "float32"]}
    for point, command, kill, epoch in TRAIN_KILLS:
        result = run_cli(*commands[command], kill=kill)
        assert result.returncode == -9, f"{point}: not killed (exit {result.returncode}): {result.stderr[-2000:]}"
        assert checkpoint(cut)["train_state"]["epoch"] == epoch, point
        best = load_model(cut / "best")  # always loadable: from best/ or, mid-swap, from best.old/
        assert best.decoder.args.hidden_dim == 16, point
        if command == "export":
            assert not (cut / "best").exists() and (cut / "best.old").exists()

    result = run_cli(*commands["resume"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert not same_tensors(trained_tensors(whole), trained_tensors(cut))
    resumed = checkpoint(cut)["train_state"]["history"]
    def strip(rows: list[dict]) -> list[dict]:  # without the timings, which differ run to run
        return [{k: v for k, v in r.items() if k not in ("seconds", "captions_per_s")} for r in rows]
    assert strip(resumed) == strip(history)
    assert not same_tensors(load_model(whole / "best").decoder.state_dict(),
                            load_model(cut / "best").decoder.state_dict())


@pytest.mark.slow
@pytest.mark.cli
def test_distributed_run_saves_every_rank_and_resumes_exactly(prepared, tmp_path):
    """Two CPU processes (gloo): ranks draw their own dropout and sampling (their states differ) and
    each rank's state is saved; one epoch then a resumed second equals two epochs in one go."""
    import socket

    def torchrun(run: Path, epochs: int, *extra: str) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "-m", "captioner.cli", "train", "--prepared", str(prepared), "--run-dir", str(run), "--epochs",
               str(epochs),
               "--batch-size", "4", "--hidden-dim", "16", "--embed-dim", "16", "--attention-dim", "16",
               "--context-dim", "16", "--device", "cpu", "--no-amp", "--teacher-forcing-end", "0.5", *extra]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        assert "2 processes" in result.stdout and (run / "best" / "model.safetensors").exists()

    torchrun(tmp_path / "cut", 1)
    rng = checkpoint(tmp_path / "cut")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    torchrun(tmp_path / "cut", 2, "--resume")
    torchrun(tmp_path / "whole", 2)
    assert not same_tensors(trained_tensors(tmp_path / "whole"), trained_tensors(tmp_path / "cut"))


def small_train(prepared: Path, run: Path, epochs: int = 2) -> list[str]:
    return ["train", "--prepared", str(prepared), "--run-dir", str(run), "--epochs", str(epochs), "--batch-size", "4",
            "--embed-dim", "16", "--attention-dim", "16", "--hidden-dim", "16", "--context-dim", "16",
            "--max-length", "6", "--lr", "3e-3", "--no-amp"]


@pytest.mark.slow
@pytest.mark.parametrize("file", ["last.pt", "model.safetensors"])
def test_a_full_disk_stops_training_with_a_message_and_whole_files(prepared, tmp_path, monkeypatch, capsys, file):
    """ENOSPC on epoch 2's checkpoint, or on its new best model: the run ends with what to do (no
    traceback); the last checkpoint (epoch 1) and best/ still load; no temporary file is left;
    `--resume` then finishes the run. (The writer is patched: writes half, then raises ENOSPC, as a
    full disk does; test_a_real_full_disk checks the same on a real one where it can be mounted.)"""
    run = tmp_path / "run"
    real, state = Path.write_bytes, {"armed": False}

    def full_disk(self, data):
        if state["armed"] and self.name.startswith(file):
            real(self, bytes(memoryview(data)[: len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    def rising_score_and_full_disk_in_epoch_two(*args, **kwargs):  # a better dev score each epoch: best/ is rewritten
        state["armed"] = (run / "last.pt").exists()
        return {"Bleu_4": 0.0, "CIDEr": 1.0 + state["armed"]}

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    monkeypatch.setattr(train_mod, "validate", rising_score_and_full_disk_in_epoch_two)
    assert main(small_train(prepared, run)) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "--resume" in err and "Traceback" not in err
    assert "cannot save epoch 2" in err
    assert checkpoint(run)["train_state"]["epoch"] == 1
    best = load_model(run / "best").decoder.state_dict()
    # best/ is written before last.pt: with its own write failed it is epoch 1's, like last.pt; else epoch 2's
    assert (not same_tensors(best, checkpoint(run)["decoder"])) == (file == "model.safetensors")
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name or "old" in p.name) == []
    monkeypatch.undo()
    assert main(small_train(prepared, run) + ["--resume"]) == 0
    assert checkpoint(run)["train_state"]["epoch"] == 2


@pytest.mark.slow
def test_a_real_full_disk(prepared, tmp_path, capsys, monkeypatch):
    """The run folder on a small tmpfs, filled up during epoch 2's validation: torch.save and safetensors
    would raise their own error types on a full disk; the run must still end with ENOSPC and whole files."""
    run = tmp_path / "run"
    run.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(run)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        real_validate = train_mod.validate

        def fill_disk_in_epoch_two(*args, **kwargs):
            scores = real_validate(*args, **kwargs)
            if (run / "last.pt").exists():
                with open(run / "filler", "wb") as f:
                    try:
                        while True:
                            f.write(b"\0" * 65536)
                    except OSError:
                        pass
            return scores

        monkeypatch.setattr(train_mod, "validate", fill_disk_in_epoch_two)
        assert main(small_train(prepared, run)) == 2
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err
        assert checkpoint(run)["train_state"]["epoch"] == 1
        load_model(run / "best")
        (run / "filler").unlink()
        monkeypatch.undo()
        assert main(small_train(prepared, run) + ["--resume"]) == 0
    finally:
        subprocess.run(["umount", str(run)], check=True)


@pytest.mark.slow
def test_a_read_only_run_folder_gives_a_message_and_keeps_the_checkpoint(prepared, tmp_path, capsys):
    """chmod does not stop root, so as root the folder is made immutable (chattr +i), which does."""
    run = tmp_path / "run"
    assert main(small_train(prepared, run, epochs=1)) == 0
    before = (run / "last.pt").read_bytes()
    root = os.geteuid() == 0
    lock = ["chattr", "+i", str(run)] if root else ["chmod", "a-w", str(run)]
    unlock = ["chattr", "-i", str(run)] if root else ["chmod", "u+w", str(run)]
    if shutil.which(lock[0]) is None or subprocess.run(lock, capture_output=True).returncode:
        pytest.skip(f"cannot make a folder read-only here ({' '.join(lock)} failed)")
    try:
        assert main(small_train(prepared, run) + ["--resume"]) == 2
    finally:
        subprocess.run(unlock, check=True)
    err = capsys.readouterr().err
    assert "cannot save the run's config" in err and "writable" in err and "Traceback" not in err
    assert (run / "last.pt").read_bytes() == before
    assert main(small_train(prepared, run) + ["--resume"]) == 0


# ---------------------------------------------------------------- prepare

PREPARE_KILLS = [
    ("while records.json is written", ("os:replace", "os.path.basename(str(args[1])) == 'records.json'", 1, "before")),
    ("after a batch's features, before its status (batch 2)", ("captioner.features:_save_status", "True", 3, "before")),
    ("while status.npy is replaced (the resumed run's third batch)",
     ("os:replace", "os.path.basename(str(args[1])) == 'status.npy'", 3, "before")),
]


@pytest.mark.slow
@pytest.mark.cli
def test_killed_prepare_resumes_to_identical_features_even_from_a_cut_file(tmp_path):
    """One prepare killed at each point in turn, then its feature file cut short as a kill during its
    creation or a full disk would leave it: run again, it ends byte-identical to an uninterrupted one."""
    data = write_flickr_dataset(tmp_path / "data", n=12, size=32)
    args = ["prepare", "--data", str(data), "--prepared", str(tmp_path / "cut"), "--prepare-batch-size", "2",
            "--min-count", "1"]
    whole = prepare(Config(data=str(data), prepared=str(tmp_path / "whole"), prepare_batch_size=2, min_count=1),
                    log=lambda s: None)
    for point, kill in PREPARE_KILLS:
        result = run_cli(*args, kill=kill)
        assert result.returncode == -9, f"{point}: not killed (exit {result.returncode}): {result.stderr[-2000:]}"
    status = np.load(tmp_path / "cut" / "status.npy")
    assert 0 < (status == DONE).sum() < len(status)
    with pytest.raises(ValueError, match="did not finish"):  # training refuses the unfinished folder up front
        train_mod.train(Config(prepared=str(tmp_path / "cut"), run_dir=str(tmp_path / "run")), log=lambda s: None)
    features = tmp_path / "cut" / "features.f16"
    row = features.stat().st_size // len(status)
    os.truncate(features, row + row // 2)  # one row and a half survive
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "cut short" in result.stdout
    assert features.read_bytes() == (tmp_path / "whole" / "features.f16").read_bytes()
    assert (np.load(tmp_path / "cut" / "status.npy") == whole.status).all()


# ---------------------------------------------------------------- the atomic writes themselves

def test_folder_swap_leaves_a_whole_version_at_every_step(tmp_path, monkeypatch):
    """A failure at each step of replace_folder: readers always find one whole version, and the next
    write recovers."""
    path = tmp_path / "best"
    def write(text: str) -> Callable[[Path], object]:
        return lambda folder: [(folder / name).write_text(text) for name in ("a", "b")]

    def read(folder: Path) -> set[str]:
        return {(folder / "a").read_text(), (folder / "b").read_text()}
    atomic.replace_folder(path, write("v1"))
    assert atomic.read_folder(path, read) == {"v1"}

    def broken(folder: Path) -> None:
        (folder / "a").write_text("v2")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        atomic.replace_folder(path, broken)
    assert atomic.read_folder(path, read) == {"v1"} and not (tmp_path / "best.tmp").exists()

    real, calls = os.replace, {"n": 0}

    def crash_before_second_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # a crash between `best -> best.old` and `best.tmp -> best`
        return real(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_second_rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_folder(path, write("v2"))
    monkeypatch.setattr(os, "replace", real)
    assert not path.exists() and atomic.whole_version(path) == tmp_path / "best.old"
    assert atomic.read_folder(path, read) == {"v1"}
    atomic.replace_folder(path, write("v3"))
    assert atomic.read_folder(path, read) == {"v3"} and not (tmp_path / "best.old").exists()


def test_read_folder_reads_again_when_the_folder_is_swapped_under_it(tmp_path):
    path = tmp_path / "best"
    atomic.replace_folder(path, lambda f: [(f / n).write_text("v1") for n in ("a", "b")])
    swapped = {"done": False}

    def slow_reader(folder: Path) -> set[str]:
        first = (folder / "a").read_text()
        if not swapped["done"]:  # a writer swaps in v2 between this reader's two files
            swapped["done"] = True
            atomic.replace_folder(path, lambda f: [(f / n).write_text("v2") for n in ("a", "b")])
        return {first, (folder / "b").read_text()}

    assert atomic.read_folder(path, slow_reader) == {"v2"}


def test_replace_file_keeps_the_old_content_when_the_write_fails(tmp_path):
    path = tmp_path / "metrics.csv"
    atomic.replace_file(path, lambda tmp: tmp.write_text("old"))

    def half_then_full(tmp: Path) -> None:
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic.replace_file(path, half_then_full)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]
