import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from captioner import encoders
from captioner.config import Config
from captioner.features import DONE, FAILED, open_prepared, prepare

from helpers import ROOT, write_flickr_dataset


def config(data: Path, out: Path, **kw) -> Config:
    return Config(**{"data": str(data), "prepared": str(out), "min_count": 1, "prepare_batch_size": 4, **kw})


def test_prepare_makes_a_ready_folder(tiny_dataset, tmp_path):
    logs: list[str] = []
    prep = prepare(config(tiny_dataset, tmp_path / "p"), log=logs.append)
    assert prep.features.shape == (12, 49, 1280) and prep.features.dtype == np.float16
    assert (prep.status == DONE).all()
    assert prep.spec["encoder"] == "efficientnet_lite0" and prep.spec["image_size"] == 224
    assert len(prep.indices("train")) == 8 and len(prep.indices("val")) + len(prep.indices("test")) == 4
    assert "noise" in prep.vocab.stoi and "red" in prep.vocab.stoi
    assert np.abs(prep.features[0].astype(np.float32)).sum() > 0
    assert not np.array_equal(prep.features[0], prep.features[1])
    assert any("12 images" in line for line in logs)
    reopened = open_prepared(tmp_path / "p")
    assert [r.name for r in reopened.records] == [r.name for r in prep.records]


def test_interrupted_prepare_resumes_to_identical_features(tiny_dataset, tmp_path, monkeypatch):
    prepare(config(tiny_dataset, tmp_path / "whole"), log=lambda s: None)
    whole = (tmp_path / "whole" / "features.f16").read_bytes()

    calls = {"n": 0}
    forward = encoders.Encoder.__call__

    def interrupt_on_third_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(encoders.Encoder, "__call__", interrupt_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        prepare(config(tiny_dataset, tmp_path / "cut"), log=lambda s: None)
    status = np.load(tmp_path / "cut" / "status.npy")
    assert (status == DONE).sum() == 8 and (status == 0).sum() == 4  # two batches of four made it
    monkeypatch.setattr(encoders.Encoder, "__call__", forward)
    logs: list[str] = []
    prepare(config(tiny_dataset, tmp_path / "cut"), log=logs.append)
    assert any("resuming" in line for line in logs)
    assert (tmp_path / "cut" / "features.f16").read_bytes() == whole


@pytest.mark.slow
@pytest.mark.cli
def test_killed_prepare_process_resumes(tmp_path):
    data = write_flickr_dataset(tmp_path / "data", n=40, size=32)
    out = tmp_path / "p"
    cmd = [sys.executable, "-m", "captioner.cli", "prepare", "--data", str(data), "--prepared", str(out),
           "--prepare-batch-size", "2", "--min-count", "1"]
    # features are bit-equal at equal thread counts
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if (out / "status.npy").exists() and (np.load(out / "status.npy") == DONE).sum() >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (np.load(out / "status.npy") == 0).any(), "the run ended before it could be killed"
    assert subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env).returncode == 0
    prepare(config(data, tmp_path / "whole", prepare_batch_size=2), log=lambda s: None)
    assert (out / "features.f16").read_bytes() == (tmp_path / "whole" / "features.f16").read_bytes()


def test_cache_with_other_settings_is_refused(tiny_dataset, tmp_path):
    prepare(config(tiny_dataset, tmp_path / "p"), log=lambda s: None)
    with pytest.raises(ValueError, match="efficientnet_lite0 at 224px.*not efficientnet_lite0 at 256px"):
        prepare(config(tiny_dataset, tmp_path / "p", image_size=256), log=lambda s: None)


def test_bad_images_are_reported_and_the_rest_encoded(tmp_path, capsys):
    data = write_flickr_dataset(tmp_path / "data", n=9)
    images = data / "images"
    (images / "img000.jpg").write_bytes(b"not a jpeg at all")
    good = (images / "img001.jpg").read_bytes()
    (images / "img001.jpg").write_bytes(good[: len(good) // 2])  # truncated
    Image.new("L", (40, 30), 128).save(images / "img002.jpg")  # grayscale
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(images / "img003.jpg")  # CMYK
    Image.fromarray(np.full((30, 40), 40000, dtype=np.uint16)).save(images / "img004.png")
    (images / "img004.png").rename(images / "img004.jpg")  # 16-bit under a .jpg name
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 128))
    rgba.save(images / "img005.png")
    (images / "img005.png").rename(images / "img005.jpg")
    prep = prepare(config(data, tmp_path / "p"), log=lambda s: None)
    assert list(prep.status[:6]) == [FAILED, FAILED, DONE, DONE, DONE, DONE]
    assert (prep.status[6:] == DONE).all()
    err = capsys.readouterr().err
    assert "img000.jpg" in err and "img001.jpg" in err
    assert 0 not in prep.indices("train") and 2 in prep.indices("train")


@pytest.mark.skipif(not os.environ.get("CAPTIONER_FLICKR8K"), reason="set CAPTIONER_FLICKR8K to a Flickr8k folder")
def test_prepare_on_real_flickr8k_images(tmp_path):
    """Smoke test on 300 real images: a Flickr-layout folder of links into the real corpus."""
    real = Path(os.environ["CAPTIONER_FLICKR8K"])
    lines = (real / "Flickr8k.token.txt").read_text().splitlines()
    splits = {kind: (real / f"Flickr_8k.{kind}Images.txt").read_text().split() for kind in ("train", "dev", "test")}
    chosen = {"train": splits["train"][:240], "dev": splits["dev"][:30], "test": splits["test"][:30]}
    names = {n for group in chosen.values() for n in group}
    folder = tmp_path / "flickr"
    (folder / "images").mkdir(parents=True)
    for name in names:
        (folder / "images" / name).symlink_to(real / "images" / name)
    (folder / "Flickr8k.token.txt").write_text("\n".join(line for line in lines if line.split("#")[0] in names) + "\n")
    for kind, group in chosen.items():
        (folder / f"Flickr_8k.{kind}Images.txt").write_text("\n".join(group) + "\n")
    prep = prepare(Config(data=str(folder), prepared=str(tmp_path / "p"), prepare_batch_size=32), log=lambda s: None)
    assert (prep.status == DONE).all() and prep.features.shape == (300, 49, 1280)
    assert [len(prep.indices(s)) for s in ("train", "val", "test")] == [240, 30, 30]
    assert all(len(r.captions) == 5 for r in prep.records)
    assert {"dog", "man", "water"} <= set(prep.vocab.itos)
    assert float(prep.features[:8].astype(np.float32).std()) > 0.1


def test_held_out_words_leave_their_train_images_out_and_nothing_else(tmp_path):
    """The novel-object protocol: train images whose captions mention a held-out word (whole tokens) are
    gone, so the vocabulary never has it; dev and test keep theirs."""
    from captioner import cli

    data = write_flickr_dataset(tmp_path / "data", n=15, size=40)  # captions "a red picture of noise", ...
    assert cli.main(["prepare", "--data", str(data), "--prepared", str(tmp_path / "all"), "--min-count", "1"]) == 0
    assert cli.main(["prepare", "--data", str(data), "--prepared", str(tmp_path / "held"), "--min-count", "1",
                     "--holdout-words", "red, Blues"]) == 0
    everything, held = open_prepared(tmp_path / "all"), open_prepared(tmp_path / "held")
    train_of = lambda p: [r for r in p.records if r.split == "train"]  # noqa: E731
    assert 0 < len(train_of(held)) < len(train_of(everything))
    assert not any("red" in c.split() for r in train_of(held) for c in r.captions)
    assert "red" not in held.vocab.stoi and "red" in everything.vocab.stoi
    assert [r.name for r in everything.records if r.split != "train"] == \
        [r.name for r in held.records if r.split != "train"]


def test_prepare_states_the_feature_cache_size_and_refuses_a_disk_without_room(tiny_dataset, tmp_path, monkeypatch,
                                                                                capsys):
    """12 images x 49 positions x 1280 channels x 2 bytes = 1,505,280 bytes: said before extraction, and a disk
    with less free space is refused in one line that names the folder, the bytes needed and the bytes free."""
    import shutil

    from captioner import cli

    free = {"bytes": 1_000_000}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 0, free["bytes"]))
    out = tmp_path / "p"
    with pytest.raises(OSError, match=rf"^{out}: the feature cache needs 1505280 bytes \(1\.5 MB\) more, but only "
                                      r"1000000 bytes \(1\.0 MB\) are free there"):
        prepare(config(tiny_dataset, out), log=lambda s: None)
    assert not (out / "features.f16").exists()
    assert cli.main(["prepare", "--data", str(tiny_dataset), "--prepared", str(out), "--min-count", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"captioner prepare: error: {out}: the feature cache needs") and "\n" not in err

    free["bytes"] = 1_505_280  # exactly enough
    logs: list[str] = []
    prep = prepare(config(tiny_dataset, out), log=logs.append)
    assert (prep.status == DONE).all()
    assert f"feature cache: 12 images x 49 positions x 1280 channels x 2 bytes = 1.5 MB in {out}" in logs
    free["bytes"] = 0  # a finished cache needs nothing more: running prepare again still works
    prepare(config(tiny_dataset, out), log=lambda s: None)
