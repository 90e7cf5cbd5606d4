"""The first-run path: `prepare --max-images N` keeps the first images of each split in a fixed proportion, and
configs/quickstart.yaml is a small run on Flickr8k."""
from __future__ import annotations

from pathlib import Path

import pytest

from captioner.config import Config
from captioner.data import Record
from captioner.features import first_images, open_prepared

from helpers import ROOT, write_flickr_dataset


def records(train: int, val: int, test: int) -> list[Record]:
    splits = ["train"] * train + ["val"] * val + ["test"] * test
    order = sorted(range(len(splits)), key=lambda i: (i * 7) % len(splits))  # splits interleaved, as files list them
    return [Record(Path(f"/d/{i}.jpg"), ("c",), splits[i]) for i in order]


@pytest.mark.parametrize("n, expected", [(300, (240, 30, 30)), (10, (8, 1, 1)), (3, (1, 1, 1)), (2, (2, 0, 0)),
                                         (25, (21, 2, 2))])
def test_first_images_keeps_80_10_10_in_the_annotations_order(n: int, expected: tuple[int, int, int]) -> None:
    everything = records(400, 50, 50)
    kept = first_images(everything, n)
    assert tuple(sum(r.split == s for r in kept) for s in ("train", "val", "test")) == expected
    for split in ("train", "val", "test"):  # the first of each split, in their order
        of_split = [r for r in everything if r.split == split]
        assert [r for r in kept if r.split == split] == of_split[:sum(r.split == split for r in kept)]
    assert [everything.index(r) for r in kept] == sorted(everything.index(r) for r in kept)


def test_first_images_takes_what_a_short_split_has_and_zero_keeps_all() -> None:
    assert [r.split for r in first_images(records(20, 0, 1), 10)].count("test") == 1
    assert len(first_images(records(20, 0, 1), 10)) == 9  # 8 train + 1 test: no val to give
    assert first_images(records(5, 5, 5), 0) == records(5, 5, 5)


def test_prepare_with_max_images_keeps_and_encodes_only_those(tmp_path: Path) -> None:
    from captioner.features import prepare

    data = write_flickr_dataset(tmp_path / "data", n=30, size=32)  # 20 train, 5 dev (odd), 5 test (even)
    logs: list[str] = []
    prepare(Config(data=str(data), prepared=str(tmp_path / "p"), min_count=1, max_images=10), log=logs.append)
    assert "max_images 10: kept the first 10 images" in logs
    prep = open_prepared(tmp_path / "p")
    assert [(r.name, r.split) for r in prep.records] == [(f"img{i:03d}.jpg", "train") for i in range(8)] + \
        [("img020.jpg", "test"), ("img021.jpg", "val")]
    assert prep.features.shape[0] == 10


def test_quickstart_config_is_a_small_run_on_a_few_hundred_flickr8k_photos() -> None:
    cfg = Config.load(ROOT / "configs" / "quickstart.yaml")
    assert 100 <= cfg.max_images <= 500 and cfg.epochs <= 5
    assert (ROOT / cfg.data).resolve() == (ROOT.parent / "shared" / "data" / "flickr8k").resolve()
    assert cfg.hidden_dim < Config().hidden_dim and cfg.prepared != Config().prepared
    assert "quickstart:" in (ROOT / "Makefile").read_text()


def test_prepare_max_images_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from captioner import cli

    data = write_flickr_dataset(tmp_path / "data", n=30, size=32)
    assert cli.main(["prepare", "--data", str(data), "--prepared", str(tmp_path / "p"), "--min-count", "1",
                     "--max-images", "10"]) == 0
    assert "(train 8, val 1, test 1)" in capsys.readouterr().out
    assert open_prepared(tmp_path / "p").features.shape[0] == 10
