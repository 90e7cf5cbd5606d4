"""COCO and Flickr30k read from the layouts they are downloaded in, on small generated copies of those layouts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import DatasetError, detect_format, load_dataset


def jpeg(path: Path, seed: int = 0) -> None:
    """A tiny real JPEG, so the readers' existence checks see a file like the downloaded ones."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def coco_file(path: Path, images: dict[int, str], captions: int = 2) -> None:
    """A captions_*.json as COCO ships it: info, licenses, images, annotations (ids out of order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    anns = [{"id": 1000 * k + i, "image_id": i, "caption": f"caption {k} of image {i} ."}
            for i in images for k in range(captions)]
    listed = [{"id": i, "file_name": f, "height": 8, "width": 8} for i, f in images.items()]
    path.write_text(json.dumps({"info": {"year": 2017}, "licenses": [], "images": listed, "annotations": anns}))


def coco_layout(root: Path, year: int, train_ids: list[int], val_ids: list[int]) -> Path:
    """COCO as it unpacks: coco/annotations/captions_{train,val}YEAR.json beside coco/trainYEAR/ and coco/valYEAR/;
    2017 names its files by the 12-digit id, 2014 as COCO_train2014_000000000009.jpg."""
    for split, ids in (("train", train_ids), ("val", val_ids)):
        prefix = f"COCO_{split}{year}_" if year == 2014 else ""
        names = {i: f"{prefix}{i:012d}.jpg" for i in ids}
        for i, name in names.items():
            jpeg(root / f"{split}{year}" / name, i)
        coco_file(root / "annotations" / f"captions_{split}{year}.json", names)
    (root / "annotations" / f"instances_val{year}.json").write_text("{}")  # the other annotation files are ignored
    return root


def coco_2017(root: Path, train_ids: list[int], val_ids: list[int]) -> Path:
    return coco_layout(root, 2017, train_ids, val_ids)


def coco_2014(root: Path, train_ids: list[int], val_ids: list[int]) -> Path:
    return coco_layout(root, 2014, train_ids, val_ids)


def karpathy_coco(path: Path, splits: dict[tuple[str, int], str]) -> Path:
    """dataset_coco.json: 2014 file names, cocoid, and Karpathy's split (restval is train)."""
    images = [{"filepath": f"{folder}2014", "filename": f"COCO_{folder}2014_{i:012d}.jpg", "cocoid": i,
               "split": split, "sentences": [{"raw": "x", "tokens": ["x"]}]} for (folder, i), split in splits.items()]
    path.write_text(json.dumps({"dataset": "coco", "images": images}))
    return path


def split_of(data) -> dict[str, str]:
    return {r.name: r.split for r in data.records}


def test_coco_2017_layout_is_detected_and_val_is_split_by_the_stated_rule(tmp_path: Path) -> None:
    root = coco_2017(tmp_path / "coco", [9, 25, 30], [885, 139, 632, 724])  # val ids deliberately unsorted
    assert detect_format(root) == "coco"
    data = load_dataset(root)
    assert data.format == "coco"
    # sorted by id: 139, 632 test; 724, 885 val (min(5000, 4 // 2) = 2 each), none left for train
    assert split_of(data) == {
        "train2017/000000000009.jpg": "train", "train2017/000000000025.jpg": "train",
        "train2017/000000000030.jpg": "train",
        "val2017/000000000139.jpg": "test", "val2017/000000000632.jpg": "test",
        "val2017/000000000724.jpg": "val", "val2017/000000000885.jpg": "val",
    }
    assert all(len(r.captions) == 2 and r.image.is_file() for r in data.records)
    assert "splits: no Karpathy split file (dataset_coco.json)" in data.summary()
    assert "the first 2 test, the next 2 val, the other 0 train" in data.splits


def test_coco_rule_keeps_val_at_5000_and_gives_the_rest_to_train(tmp_path: Path) -> None:
    from captioner.data import _coco_rule

    entries = [(f"val2014/{i}.jpg", ["c"], "val", "") for i in range(12_000, 0, -1)]
    entries.append(("train2014/t.jpg", ["c"], "train", ""))
    out, rule = _coco_rule(entries, {e[0]: int(e[0][8:-4]) if e[2] == "val" else 0 for e in entries})
    got = {name: split for name, _, split, _ in out}
    assert [got[f"val2014/{i}.jpg"] for i in (1, 5000, 5001, 10_000, 10_001, 12_000)] == \
        ["test", "test", "val", "val", "train", "train"]
    assert sum(s == "test" for s in got.values()) == 5000 and got["train2014/t.jpg"] == "train"
    assert "the first 5000 test, the next 5000 val, the other 2000 train" in rule


def test_coco_2014_layout_uses_karpathys_split_file_beside_it(tmp_path: Path) -> None:
    root = coco_2014(tmp_path / "coco", [9, 25], [42, 73, 74])
    karpathy_coco(root / "dataset_coco.json", {("train", 9): "train", ("train", 25): "restval",
                                               ("val", 42): "test", ("val", 73): "val"})  # val 74: in no split
    assert detect_format(root) == "coco"  # the layout wins over the dataset_*.json beside it
    data = load_dataset(root)
    assert split_of(data) == {"train2014/COCO_train2014_000000000009.jpg": "train",
                              "train2014/COCO_train2014_000000000025.jpg": "train",
                              "val2014/COCO_val2014_000000000042.jpg": "test",
                              "val2014/COCO_val2014_000000000073.jpg": "val"}
    assert data.records[0].captions[0] == "caption 0 of image 9 ."  # COCO's captions, Karpathy's splits
    assert data.splits == f"Karpathy's split file {root / 'dataset_coco.json'}"
    assert any("1 images in none of its splits" in p and "000000000074" in p for p in data.problems)


def test_karpathy_coco_split_file_splits_the_2017_layout_by_image_id(tmp_path: Path) -> None:
    root = coco_2017(tmp_path / "coco", [9, 42], [73])  # 2017 moved val2014's 42 into train2017
    split_file = karpathy_coco(tmp_path / "elsewhere.json", {("train", 9): "train", ("val", 42): "test",
                                                             ("val", 73): "val"})
    data = load_dataset(root, split_file=split_file)
    assert split_of(data) == {"train2017/000000000009.jpg": "train", "train2017/000000000042.jpg": "test",
                              "val2017/000000000073.jpg": "val"}
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [{"filename": "zzz.jpg", "split": "test", "sentences": []}]}))
    with pytest.raises(DatasetError, match="names none of the 3 images"):
        load_dataset(root, split_file=other)


def test_coco_annotations_folder_finds_the_image_folders_beside_it(tmp_path: Path) -> None:
    root = coco_2014(tmp_path / "coco", [1], [2, 3])
    data = load_dataset(root / "annotations")
    assert {r.image for r in data.records} == {
        (root / "train2014" / "COCO_train2014_000000000001.jpg").resolve(),
        (root / "val2014" / "COCO_val2014_000000000002.jpg").resolve(),
        (root / "val2014" / "COCO_val2014_000000000003.jpg").resolve()}
    assert sorted(split_of(data).values()) == ["test", "train", "val"]  # the val rule: 1 test, 1 val


def test_a_folder_with_annotations_but_no_image_folders_is_not_taken_for_coco(tmp_path: Path) -> None:
    coco_file(tmp_path / "annotations" / "captions_val2017.json", {1: "a.jpg"})
    with pytest.raises(DatasetError, match="cannot tell the dataset format"):
        detect_format(tmp_path)


def flickr30k_images(folder: Path, n: int) -> list[str]:
    names = [f"{1000092795 + 7919 * i}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        jpeg(folder / name, i)
    return names


def test_flickr30k_token_layout_without_split_file_uses_the_stated_rule(tmp_path: Path) -> None:
    root = tmp_path / "flickr30k"
    names = flickr30k_images(root / "flickr30k-images", 20)
    lines = [f"{name}#{k}\tcaption {k} of {name}" for name in reversed(names) for k in range(5)]
    (root / "results_20130124.token").write_text("\n".join(lines) + "\n")
    assert detect_format(root) == "flickr"
    data = load_dataset(root)
    assert len(data.records) == 20 and all(len(r.captions) == 5 and r.image.is_file() for r in data.records)
    got = split_of(data)
    assert [got[n] for n in sorted(names)[:4]] == ["test", "test", "val", "val"]  # min(1000, 20 // 10) = 2
    assert sum(s == "train" for s in got.values()) == 16
    assert "no Karpathy split file (dataset_flickr30k.json)" in data.summary()


def test_flickr30k_uses_karpathys_split_file_beside_the_token_file(tmp_path: Path) -> None:
    root = tmp_path / "flickr30k"
    names = flickr30k_images(root / "flickr30k-images", 3)
    (root / "results_20130124.token").write_text("".join(f"{n}#0\tcaption of {n}\n" for n in names))
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": [
        {"filename": n, "split": s, "sentences": []} for n, s in zip(names, ["test", "train", "val"])]}))
    data = load_dataset(root)
    assert split_of(data) == dict(zip(names, ["test", "train", "val"]))
    assert data.splits.startswith("Karpathy's split file")


def test_flickr30k_kaggle_results_csv_is_detected_and_its_broken_row_reported(tmp_path: Path) -> None:
    top = tmp_path / "flickr30k_images"
    names = flickr30k_images(top / "flickr30k_images", 10)
    rows = ["image_name| comment_number| comment"]
    rows += [f"{n}| {k}| A dog , running | jumping ." for n in names for k in range(2)]
    rows.insert(5, f"{names[1]}| 4 A dog runs across the grass .")  # the real file's row without its last '|'
    (top / "results.csv").write_text("\n".join(rows) + "\n")
    for path in (tmp_path, top, top / "results.csv"):
        assert detect_format(path) == "flickr"
        data = load_dataset(path)
        assert len(data.records) == 10 and data.records[0].image == (top / "flickr30k_images" / names[0]).resolve()
        assert data.records[0].captions == ("A dog , running | jumping .",) * 2  # a '|' in a caption is kept
        assert any("1 lines without" in p and "lines 6" in p for p in data.problems)
        assert sorted(split_of(data).values()).count("test") == 1  # min(1000, 10 // 10)


def test_prepare_reads_the_coco_layout_with_a_split_file_given_on_the_command_line(tmp_path: Path, capsys) -> None:
    from captioner import cli
    from captioner.features import open_prepared

    root = coco_2017(tmp_path / "coco", [9, 25, 30, 42], [73, 74])
    split_file = karpathy_coco(tmp_path / "dataset_coco.json", {("train", 9): "train", ("train", 25): "restval",
                                                                ("train", 30): "train", ("val", 42): "test",
                                                                ("val", 73): "val", ("val", 74): "test"})
    assert cli.main(["prepare", "--data", str(root), "--prepared", str(tmp_path / "p"), "--min-count", "1",
                     "--split-file", str(split_file)]) == 0
    out = capsys.readouterr().out
    assert f"splits: Karpathy's split file {split_file}" in out
    assert "feature cache: 6 images x 49 positions x 1280 channels x 2 bytes = 752.6 KB" in out
    prep = open_prepared(tmp_path / "p")
    assert {r.name: r.split for r in prep.records} == {
        "train2017/000000000009.jpg": "train", "train2017/000000000025.jpg": "train",
        "train2017/000000000030.jpg": "train", "train2017/000000000042.jpg": "test",
        "val2017/000000000073.jpg": "val", "val2017/000000000074.jpg": "test"}
