import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioner.data import (
    Dataset,
    DatasetError,
    ImageError,
    ImageTooLarge,
    Record,
    detect_format,
    load_dataset,
    load_image,
)

SHAPES = Path(__file__).resolve().parent.parent / "examples" / "shapes"


def write_images(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), (200, 10, 10)).save(folder / name)


def write_flickr(folder: Path, token_lines: list[str], splits: dict[str, list[str]] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / "Flickr8k.token.txt"
    token.write_text("".join(line + "\n" for line in token_lines))
    for kind, names in (splits or {}).items():
        (folder / f"Flickr_8k.{kind}Images.txt").write_text("".join(n + "\n" for n in names))
    return token


# ---- flickr ----


def test_flickr_records_splits_order_and_quirk(tmp_path: Path) -> None:
    write_images(tmp_path / "Flicker8k_Dataset", "b.jpg", "a.jpg", "c.jpg")
    write_flickr(
        tmp_path,
        [
            "b.jpg#0\tA dog runs .",
            "a.jpg#0\t  a cat sits  ",
            "a.jpg.1#0\tpeople waiting for the subway",  # the real corpus's typo: not an image, in no split
            "b.jpg#1\tA dog , running",
            "a.jpg#1\tcat",
            "c.jpg#0\ta bird",
        ],
        {"train": ["a.jpg", "b.jpg"], "dev": ["c.jpg"], "test": []},
    )
    data = load_dataset(tmp_path)
    assert data.format == "flickr"
    assert [r.name for r in data.records] == ["b.jpg", "a.jpg", "c.jpg"]  # order of first appearance
    assert data.records[0].captions == ("A dog runs .", "A dog , running")
    assert data.records[1].captions == ("a cat sits", "cat")
    assert [r.split for r in data.records] == ["train", "train", "val"]  # dev -> val
    assert data.records[0].image == (tmp_path / "Flicker8k_Dataset" / "b.jpg").resolve()
    assert data.records[0].image.is_absolute()
    assert len(data.problems) == 1 and "a.jpg.1" in data.problems[0]
    assert data.missing == []


def test_flickr_without_split_files_is_unassigned(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.jpg")
    write_flickr(tmp_path, ["a.jpg#0\tone", "a.jpg#1\ttwo"])
    data = load_dataset(tmp_path, format="flickr")
    assert [(r.split, r.captions) for r in data.records] == [("", ("one", "two"))]
    assert data.split("") == data.records and data.split("train") == []


def test_flickr_images_folder_fallbacks(tmp_path: Path) -> None:
    write_images(tmp_path, "a.jpg")  # no images/ folder: the images sit beside the token file
    write_flickr(tmp_path, ["a.jpg#0\tone"])
    assert load_dataset(tmp_path).records[0].image == (tmp_path / "a.jpg").resolve()
    elsewhere = tmp_path / "pics"
    write_images(elsewhere, "a.jpg")
    assert load_dataset(tmp_path, images=elsewhere).records[0].image == (elsewhere / "a.jpg").resolve()


@pytest.mark.parametrize("bad", ["a.jpg#0 no tab here", "a.jpg\tno hash"])
def test_flickr_malformed_line_names_file_and_line(tmp_path: Path, bad: str) -> None:
    token = write_flickr(tmp_path, ["a.jpg#0\tfine", "", bad])
    with pytest.raises(DatasetError, match=re.escape(f"{token}:3: ")):
        load_dataset(tmp_path)


def test_lemma_token_file_is_not_taken_for_captions(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.jpg")
    (tmp_path / "Flickr8k.lemma.token.txt").write_text("a.jpg#0\tcat sit\n")
    (tmp_path / "Other.token.txt").write_text("a.jpg#0\tcats sitting\n")
    assert load_dataset(tmp_path).records[0].captions == ("cats sitting",)


def test_missing_images_fail_by_default_and_are_skipped_on_request(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.jpg", "c.jpg")
    token = write_flickr(tmp_path, ["a.jpg#0\tx", "b.jpg#0\ty", "c.jpg#0\tz"])
    with pytest.raises(
        DatasetError, match=re.escape(f"1 of 3 images listed in {token} are missing") + ".*b.jpg.*--skip-missing"
    ):
        load_dataset(tmp_path)
    data = load_dataset(tmp_path, skip_missing=True)
    assert [r.name for r in data.records] == ["a.jpg", "c.jpg"]
    assert data.missing == [(tmp_path / "images" / "b.jpg").resolve()]
    assert "1 missing" in data.summary()


def test_empty_captions_are_dropped_and_reported(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.jpg", "b.jpg")
    write_flickr(tmp_path, ["a.jpg#0\tgood", "a.jpg#1\t   ", "b.jpg#0\t"])
    data = load_dataset(tmp_path)
    assert [(r.name, r.captions) for r in data.records] == [("a.jpg", ("good",))]
    assert any("2 empty captions" in p and ":2" in p for p in data.problems)
    assert any("no captions" in p and "b.jpg" in p for p in data.problems)


# ---- kaggle ----


def test_kaggle_csv_with_commas(tmp_path: Path) -> None:
    write_images(tmp_path / "Images", "a.jpg", "b.jpg")
    (tmp_path / "captions.txt").write_text(
        'image,caption\na.jpg,"A dog, wet, shakes ."\na.jpg,A dog .\nb.jpg,"He said ""hi"""\n'
    )
    for path in (tmp_path, tmp_path / "captions.txt"):
        data = load_dataset(path)
        assert data.format == "kaggle"
        assert [(r.name, r.captions, r.split) for r in data.records] == [
            ("a.jpg", ("A dog, wet, shakes .", "A dog ."), ""),
            ("b.jpg", ('He said "hi"',), ""),
        ]
        assert data.records[0].image == (tmp_path / "Images" / "a.jpg").resolve()


def test_kaggle_row_with_wrong_field_count_names_line(tmp_path: Path) -> None:
    (tmp_path / "captions.txt").write_text("image,caption\na.jpg,fine\nb.jpg,un,quoted\n")
    with pytest.raises(DatasetError, match=r"captions.txt:3: expected 2 fields"):
        load_dataset(tmp_path, format="kaggle")


# ---- karpathy ----


def karpathy_json(images: list[dict]) -> str:
    return json.dumps({"dataset": "test", "images": images})


def test_karpathy_splits_and_filepath(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.jpg", "val2014/b.jpg", "c.jpg")
    sentences = [{"raw": "A thing .", "tokens": ["a", "thing"]}, {"raw": " another "}]
    (tmp_path / "dataset_test.json").write_text(
        karpathy_json(
            [
                {"filename": "a.jpg", "split": "restval", "sentences": sentences},
                {"filepath": "val2014", "filename": "b.jpg", "split": "val", "sentences": sentences},
                {"filename": "c.jpg", "split": "test", "sentences": sentences[:1]},
            ]
        )
    )
    for path in (tmp_path, tmp_path / "dataset_test.json"):
        data = load_dataset(path)
        assert data.format == "karpathy"
        assert [(r.name, r.split) for r in data.records] == [
            ("a.jpg", "train"),
            ("val2014/b.jpg", "val"),
            ("c.jpg", "test"),
        ]
        assert data.records[0].captions == ("A thing .", "another")
        assert data.records[1].image == (tmp_path / "images" / "val2014" / "b.jpg").resolve()


def test_karpathy_missing_key_names_file_and_image(tmp_path: Path) -> None:
    write_images(tmp_path, "a.jpg")
    file = tmp_path / "dataset_x.json"
    file.write_text(
        karpathy_json(
            [{"filename": "a.jpg", "split": "train", "sentences": []}, {"filename": "b.jpg", "split": "train"}]
        )
    )
    with pytest.raises(DatasetError, match=r"dataset_x.json: images\[1\]: missing 'sentences'"):
        load_dataset(file)


# ---- coco ----


def coco_json(images: list[tuple[int, str]], annotations: list[tuple[int, str]]) -> str:
    return json.dumps(
        {
            "info": {},
            "images": [{"id": i, "file_name": f} for i, f in images],
            "annotations": [{"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(annotations)],
        }
    )


def test_coco_folder_of_caption_files(tmp_path: Path) -> None:
    write_images(tmp_path / "val2014", "v1.jpg")
    write_images(tmp_path / "train2014", "t1.jpg")
    (tmp_path / "captions_val2014.json").write_text(
        coco_json([(1, "v1.jpg"), (2, "v2.jpg")], [(1, "a cat"), (1, "cat "), (9, "orphan")])
    )
    (tmp_path / "captions_train2014.json").write_text(coco_json([(5, "t1.jpg")], [(5, "a dog")]))
    data = load_dataset(tmp_path)
    assert data.format == "coco"
    assert {(r.name, r.split, r.captions) for r in data.records} == {
        ("val2014/v1.jpg", "val", ("a cat", "cat")),
        ("train2014/t1.jpg", "train", ("a dog",)),
    }
    assert any("1 annotations" in p for p in data.problems)  # image_id 9 is in no image
    assert any("v2.jpg" in p for p in data.problems)  # an image without captions


def test_coco_single_file_with_images_argument(tmp_path: Path) -> None:
    write_images(tmp_path / "pics", "x.jpg")
    file = tmp_path / "annotations" / "my_captions.json"
    file.parent.mkdir()
    file.write_text(coco_json([(3, "x.jpg")], [(3, "a red square")]))
    data = load_dataset(file, images=tmp_path / "pics")
    assert [(r.name, r.split, r.captions) for r in data.records] == [("x.jpg", "", ("a red square",))]


def test_coco_missing_field_names_annotation(tmp_path: Path) -> None:
    file = tmp_path / "captions_val2014.json"
    file.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}))
    with pytest.raises(DatasetError, match=r"annotations\[0\]: missing 'caption'"):
        load_dataset(file)


# ---- custom ----


def test_custom_csv_merges_rows_and_reads_splits(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.png", "b.png")
    (tmp_path / "captions.csv").write_text(
        '\ufeffimage,split,caption\na.png,train,one\nb.png,dev,"two, too"\na.png,train,three\n'
    )
    data = load_dataset(tmp_path)
    assert data.format == "custom"
    assert [(r.name, r.split, r.captions) for r in data.records] == [
        ("a.png", "train", ("one", "three")),
        ("b.png", "val", ("two, too",)),
    ]


def test_custom_csv_needs_image_and_caption_columns(tmp_path: Path) -> None:
    (tmp_path / "captions.csv").write_text("file,text\na.png,one\n")
    with pytest.raises(DatasetError, match=r"captions.csv:1: .*image and caption"):
        load_dataset(tmp_path, format="custom")


def test_custom_jsonl(tmp_path: Path) -> None:
    write_images(tmp_path, "a.jpg", "sub/b.jpg")
    lines = [
        {"image": "a.jpg", "caption": "one", "split": "test"},
        {"image": "sub/b.jpg", "captions": ["two", "three"]},
        {"image": "a.jpg", "captions": ["four"], "split": "test"},
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    data = load_dataset(tmp_path)
    assert [(r.name, r.split, r.captions) for r in data.records] == [
        ("a.jpg", "test", ("one", "four")),
        ("sub/b.jpg", "", ("two", "three")),
    ]


def test_custom_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    file = tmp_path / "captions.jsonl"
    file.write_text('{"image": "a.jpg", "caption": "ok"}\n{"image": "b.jpg", "caption": \n')
    with pytest.raises(DatasetError, match=re.escape(f"{file}:2: invalid JSON")):
        load_dataset(tmp_path)


def test_custom_unknown_split_names_line(tmp_path: Path) -> None:
    (tmp_path / "captions.csv").write_text("image,caption,split\na.png,one,train\na.png,two,holdout\n")
    with pytest.raises(DatasetError, match=r"captions.csv:3: unknown split 'holdout'"):
        load_dataset(tmp_path)


def test_custom_csv_reports_every_bad_line_in_one_pass(tmp_path: Path) -> None:
    file = tmp_path / "captions.csv"
    file.write_text("image,caption,split\na.png,one,train\nb.png,un,quoted,train\na.png,two,holdout\n"
                    ",no image,train\nc.png,fine,test\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{file}: 3 bad lines, fix them and run again:"
    assert [line.strip().split(": ")[0] for line in lines[1:]] == [f"{file}:3", f"{file}:4", f"{file}:5"]
    assert "expected 3 fields" in lines[1] and "unknown split 'holdout'" in lines[2] and "no image" in lines[3]


def test_custom_jsonl_bad_lines_are_listed_up_to_a_limit(tmp_path: Path) -> None:
    file = tmp_path / "captions.jsonl"
    good = json.dumps({"image": "a.jpg", "caption": "ok"})
    bad = ['{"image": "b.jpg", "caption": ', json.dumps({"caption": "no image"}),
           json.dumps({"image": "c.jpg", "captions": ["x", 3]}), json.dumps({"image": "d.jpg", "split": "nope",
                                                                              "caption": "y"})]
    file.write_text("\n".join([good] + bad * 6 + [good]) + "\n")  # 24 bad lines, lines 2-25
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0].endswith("24 bad lines, fix them and run again:")
    assert len(lines) == 1 + 20 + 1 and lines[-1].strip() == "and 4 more"
    assert lines[1].strip().startswith(f"{file}:2: invalid JSON") and lines[4].strip().startswith(f"{file}:5: unknown")
    assert "a list of strings" in lines[3] and "'image' string" in lines[2]


def test_missing_images_are_listed_with_their_lines(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.jpg")
    rows = ["a.jpg,one"] + [f"gone{i}.jpg,caption" for i in range(23)]
    (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    with pytest.raises(DatasetError) as err:
        load_dataset(tmp_path)
    message = str(err.value)
    assert message.startswith(f"23 of 24 images listed in {tmp_path / 'captions.csv'} are missing: ")
    assert f"{(tmp_path / 'images' / 'gone0.jpg').resolve()} (line 3)" in message
    assert "gone19.jpg (line 22); and 3 more; fix the paths" in message and "gone20.jpg" not in message
    data = load_dataset(tmp_path, skip_missing=True)
    assert [r.name for r in data.records] == ["a.jpg"]
    assert any(p.startswith("23 missing images skipped") and "gone1.jpg (line 4)" in p for p in data.problems)


def test_exact_duplicate_lines_are_dropped_and_reported(tmp_path: Path) -> None:
    write_images(tmp_path / "images", "a.png", "b.png")
    (tmp_path / "captions.csv").write_text("image,caption\na.png,one\nb.png,two\na.png,one\na.png,One\n"
                                           "a.png,one\n")
    data = load_dataset(tmp_path)
    assert [(r.name, r.captions) for r in data.records] == [("a.png", ("one", "One")), ("b.png", ("two",))]
    assert data.problems == [f"{tmp_path / 'captions.csv'}: 2 exact duplicate lines dropped: "
                             "line 4 repeats line 2, line 6 repeats line 2"]
    line = json.dumps({"image": "a.png", "captions": ["x", "y"]})
    (tmp_path / "captions.csv").unlink()
    (tmp_path / "captions.jsonl").write_text(f"{line}\n{line}\n")
    data = load_dataset(tmp_path)
    assert data.records[0].captions == ("x", "y") and "line 2 repeats line 1" in data.problems[0]


# ---- detection ----


@pytest.mark.parametrize(
    "files, expected",
    [
        ({"Flickr8k.token.txt": "a.jpg#0\tx\n"}, "flickr"),
        ({"results_20130124.token": "a.jpg#0\tx\n"}, "flickr"),
        ({"captions.txt": "image,caption\na.jpg,x\n"}, "kaggle"),
        ({"captions.csv": "image,caption\n"}, "custom"),
        ({"captions.jsonl": ""}, "custom"),
        ({"dataset_flickr8k.json": karpathy_json([])}, "karpathy"),
        ({"captions_val2014.json": coco_json([], [])}, "coco"),
    ],
)
def test_detect_format_of_folder(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert detect_format(tmp_path) == expected


def test_detect_format_of_json_files_by_keys(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(karpathy_json([{"filename": "a.jpg", "split": "train", "sentences": []}]))
    (tmp_path / "b.json").write_text(coco_json([], []))
    (tmp_path / "c.json").write_text('{"something": 1}')
    assert detect_format(tmp_path / "a.json") == "karpathy"
    assert detect_format(tmp_path / "b.json") == "coco"
    with pytest.raises(DatasetError, match=r"c\.json"):
        detect_format(tmp_path / "c.json")


def test_detect_format_unknown_says_what_it_looked_for(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(DatasetError, match=r"token.*captions.txt.*dataset_\*.json.*captions_\*.json"):
        detect_format(tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(tmp_path / "nope")


# ---- records and summary ----


def test_record_name_and_summary(tmp_path: Path) -> None:
    root = tmp_path.resolve()
    a = Record(root / "val2014" / "x.jpg", ("a", "b"), "val", root)
    b = Record(root / "y.jpg", ("c",), "")
    assert a.name == "val2014/x.jpg" and b.name == "y.jpg"
    summary = Dataset([a, b], "coco", problems=["odd"]).summary().splitlines()
    assert summary == [
        "val: 1 images, 2 captions",
        "unassigned: 1 images, 1 captions",
        "coco: 0 missing images skipped, 1 problems",
    ]
    with pytest.raises(ValueError, match="dev"):
        Dataset([a], "coco").split("dev")


# ---- the shipped example ----


def test_shapes_example_loads() -> None:
    data = load_dataset(SHAPES)
    assert data.format == "flickr" and len(data.records) == 60 and not data.problems
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [40, 10, 10]
    assert all(len(r.captions) == 5 and len(set(r.captions)) == 5 for r in data.records)
    image = load_image(data.records[0].image)
    assert image.size == (96, 96) and image.mode == "RGB"


@pytest.mark.skipif(not os.environ.get("CAPTIONER_FLICKR8K"), reason="set CAPTIONER_FLICKR8K to a Flickr8k folder")
def test_real_flickr8k() -> None:
    data = load_dataset(os.environ["CAPTIONER_FLICKR8K"])
    assert [len(data.split(s)) for s in ("train", "val", "test")] == [6000, 1000, 1000]
    assert all(len(r.captions) == 5 for r in data.records)
    assert any("2258277193_586949ec62.jpg.1" in p and p.count("2258277193_586949ec62.jpg") == 2 for p in data.problems)
    assert data.missing == []


# ---- load_image ----


def test_load_image_grayscale_and_array_inputs(tmp_path: Path) -> None:
    Image.new("L", (3, 2), 77).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.mode == "RGB" and image.size == (3, 2) and image.getpixel((0, 0)) == (77, 77, 77)
    assert load_image(np.full((2, 3), 9, np.uint8)).getpixel((2, 1)) == (9, 9, 9)
    assert load_image(np.full((2, 3, 3), 0.5)).getpixel((0, 0)) == (128, 128, 128)
    assert load_image(np.full((2, 3, 3), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.zeros((2, 3, 4), np.uint8)).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
    assert load_image((tmp_path / "g.png").read_bytes()).size == (3, 2)
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((2, 3, 2), np.uint8))
    with pytest.raises(ImageError, match=r"\[0, 1\]"):
        load_image(np.full((2, 2), 255.0))  # 0-255 floats are refused, not saturated to white


def test_load_image_rgba_composites_over_white(tmp_path: Path) -> None:
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0], [0, 0, 0, 128]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert [image.getpixel((x, 0)) for x in range(3)] == [(255, 0, 0), (255, 255, 255), (127, 127, 127)]
    assert load_image(Image.fromarray(rgba, "RGBA").convert("LA")).getpixel((1, 0)) == (255, 255, 255)


def test_load_image_cmyk(tmp_path: Path) -> None:
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(tmp_path / "c.jpg").getpixel((1, 1))
    assert r > 230 and g < 25 and b < 25


def test_load_image_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16)).save(tmp_path / "d.png")
    image = load_image(tmp_path / "d.png")
    assert [image.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]


def test_load_image_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.save(tmp_path / "p.png", transparency=0)
    loaded = load_image(tmp_path / "p.png")
    assert [loaded.getpixel((x, 0)) for x in range(2)] == [(255, 255, 255), (0, 0, 255)]


def test_load_image_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (40, 20), (0, 128, 0)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (20, 40)


def test_load_image_broken_files_name_the_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.jpg").write_text("not a picture")
    (tmp_path / "empty.jpg").write_bytes(b"")
    cases = {"cut.jpg": "truncated", "notes.jpg": "not an image", "empty.jpg": "empty", "absent.jpg": "no such file"}
    for name, reason in cases.items():
        with pytest.raises(ImageError, match=re.escape(f"{tmp_path / name}: ") + f".*{reason}"):
            load_image(tmp_path / name)


def test_load_image_max_pixels_checks_the_header_before_decoding(tmp_path: Path) -> None:
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    assert load_image(tmp_path / "big.png", max_pixels=60_000).size == (300, 200)
    data = (tmp_path / "big.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:60])  # header only: decoding would fail, the size check comes first
    with pytest.raises(ImageTooLarge, match=r"cut.png: 300x200 pixels is more than the limit of 59999"):
        load_image(tmp_path / "cut.png", max_pixels=59_999)


def test_load_image_turns_pil_bomb_checks_into_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.new("RGB", (15, 10)).save(tmp_path / "warn.png")
    Image.new("RGB", (30, 10)).save(tmp_path / "error.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for name in ("warn.png", "error.png"):  # 150 pixels: PIL warns; 300 > 2 x 100: PIL raises
        with pytest.raises(ImageTooLarge, match=f"{name}: .*decompression bomb"):
            load_image(tmp_path / name)
    monkeypatch.undo()
    assert load_image(tmp_path / "error.png").size == (30, 10)


def test_load_image_names_bytes_by_the_given_name() -> None:
    with pytest.raises(ImageError, match=r"^upload\.jpg: not an image"):
        load_image(b"plain text", name="upload.jpg")
    with pytest.raises(ImageError, match=r"^<bytes>: not an image"):
        load_image(b"plain text")
