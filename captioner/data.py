"""Dataset readers and robust image loading.

Every annotation format we accept (Flickr8k/30k text, Kaggle's captions.txt, Karpathy split JSON,
COCO captions JSON, a custom csv/jsonl) is read into the same list of `Record`s, so nothing
downstream cares where captions came from. `load_image` is the one door pixels come in by, so an
odd or broken file fails there, with its name, instead of deep inside a training batch.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from .extras import install_hint

SPLITS = ("train", "val", "test")
FORMATS = ("flickr", "kaggle", "karpathy", "coco", "custom")
# split names found in the wild -> ours; "restval" is Karpathy's extra COCO training images
_SPLIT_NAMES = {"train": "train", "restval": "train", "val": "val", "dev": "val", "test": "test", "": ""}
_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset", "flickr30k_images", "flickr30k-images")
_LOOKED_FOR = (
    "a *.token.txt or *.token file or Flickr30k's results.csv (flickr), captions.txt with the header image,caption "
    "(kaggle), captions.csv or captions.jsonl (custom), dataset_*.json (karpathy), captions_*.json or "
    "annotations/captions_*.json (coco)"
)
# Karpathy's split files, looked for beside the annotations (and in COCO's annotations/) when none is given
KARPATHY_FILES = {"coco": "dataset_coco.json", "flickr": "dataset_flickr30k.json"}
# Without a Karpathy split file the held-out splits follow fixed rules with Karpathy's sizes (not his images):
# COCO: the official val images with captions, sorted by image id: the first min(5000, n // 2) are test, the
# next min(5000, rest) val, the others train (val2014: 5,000 / 5,000 / 30,504; val2017: 2,500 / 2,500 / 0).
# Flickr30k: all images sorted by file name: the first min(1000, n // 10) test, the next as many val, rest train.
COCO_HELD_OUT = 5000
FLICKR30K_HELD_OUT = 1000
MAX_REPORTED = 20  # bad lines, missing images: how many one error lists before "and N more"

# what Pillow raises for bad or hostile data: decoders raise OSError, format parsers SyntaxError or ValueError
_BOMB = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, *_BOMB)
# (image path relative to the image folder, captions, split, "file:line" to quote in messages)
Entry = tuple[str, list[Any], str, str]


# The one list of what captioner reads, shared by the folder walks (expand_inputs, bulk.walk_library) and
# load_image's routing, so a file a walk finds is one load_image reads and a file it reads is never skipped.
# HEIC/HEIF and RAW are listed whether or not their extra is installed: a walk hands them to load_image, whose
# error then says what to install, instead of passing over an iPhone's or a camera's photos without a word.
PILLOW_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif"})
HEIF_SUFFIXES = frozenset({".heic", ".heif", ".hif"})  # pillow-heif, the `heif` extra (.hif: Fujifilm's HEIF)
RAW_SUFFIXES = frozenset({".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"})  # rawpy, the `raw` extra
IMAGE_SUFFIXES = PILLOW_SUFFIXES | HEIF_SUFFIXES | RAW_SUFFIXES
# image formats that are not read, so a walk can say "unsupported format" rather than "not an image"
OTHER_IMAGE_SUFFIXES = frozenset({
    ".svg", ".svgz", ".psd", ".psb", ".xcf", ".kra", ".jxl", ".jp2", ".j2k", ".jpx", ".ico", ".icns", ".eps", ".exr",
    ".hdr", ".tga", ".pcx", ".ppm", ".pgm", ".pbm", ".jfif", ".jpe", ".apng", ".crw", ".nrw", ".pef", ".srw", ".rwl",
    ".x3f", ".3fr", ".erf", ".kdc", ".mrw", ".mos", ".iiq", ".sr2", ".srf", ".raw"})
# ISO base media brands (bytes 8-12, after "ftyp") of HEIF files, found also when the file is misnamed
_HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
_ORIENTATION = 0x0112  # EXIF Orientation
# LibRaw's `flip` (sizes.flip) -> the transpose that makes the image upright: 3 is 180 degrees, 5 is 90 degrees
# counter-clockwise, 6 is 90 degrees clockwise (EXIF orientations 3, 8 and 6)
_RAW_FLIP = {3: Image.Transpose.ROTATE_180, 5: Image.Transpose.ROTATE_90, 6: Image.Transpose.ROTATE_270}
# a RAW whose embedded preview has a shorter side than this is decoded in full instead (the encoders see 224-260 px)
MIN_RAW_PREVIEW = 256
_heif_lock = threading.Lock()
_heif_registered = False


def expand_inputs(items: list[str]) -> list[Path]:
    """Files as given, folders as the image files in them and their subfolders (sorted; hidden ones left
    out, as a photo library nests by year and event), globs expanded (for shells that do not)."""
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif not path.exists() and any(ch in item for ch in "*?["):
            paths += sorted(Path(p) for p in glob.glob(item, recursive=True))
        else:
            paths.append(path)
    return paths


class DatasetError(ValueError):
    """Annotations that cannot be read; the message names the file (and line) to fix."""


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and the reason."""


class ImageTooLarge(ImageError):
    """More pixels than allowed, found from the header before decoding (a server answers 413, not 400)."""


@dataclass(frozen=True)
class Record:
    """One image and its reference captions: what every format is read into."""

    image: Path  # absolute path of the image file
    captions: tuple[str, ...]  # raw reference captions, whitespace-stripped
    split: str  # "train" | "val" | "test" | "" (unassigned)
    root: Path | None = field(default=None, repr=False, compare=False)  # image folder, only for `name`

    @property
    def name(self) -> str:
        """The image's path under the image folder: the key split files, caches and reports use."""
        if self.root is not None and self.image.is_relative_to(self.root):
            return self.image.relative_to(self.root).as_posix()
        return self.image.name


@dataclass
class Dataset:
    """Records plus what went wrong reading them, so `prepare` can tell the user before any training."""

    records: list[Record]
    format: str
    missing: list[Path] = field(default_factory=list)  # listed in annotations, absent on disk
    problems: list[str] = field(default_factory=list)  # non-fatal oddities worth telling the user
    splits: str = ""  # where the splits came from (a split file, a stated rule), so a user knows what test means

    def split(self, name: str) -> list[Record]:
        if name not in (*SPLITS, ""):
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)} or '' (unassigned)")
        return [r for r in self.records if r.split == name]

    def summary(self) -> str:
        """What was loaded, one line per split, so a wrong path or split shows before training."""
        lines = []
        for split in (*SPLITS, ""):
            records = self.split(split)
            if records:
                captions = sum(len(r.captions) for r in records)
                lines.append(f"{split or 'unassigned'}: {len(records)} images, {captions} captions")
        lines.append(f"{self.format}: {len(self.missing)} missing images skipped, {len(self.problems)} problems")
        if self.splits:
            lines.append(f"splits: {self.splits}")
        return "\n".join(lines)


def detect_format(path: str | Path) -> str:
    """Which reader `path` needs, judged from the files present (and a JSON file's keys)."""
    return _detect(Path(path))[0]


def load_dataset(
    path: str | Path, format: str = "auto", images: str | Path | None = None, skip_missing: bool = False,
    split_file: str | Path | None = None,
) -> Dataset:
    """Read annotations in any supported format; `images` overrides where image files are looked for, and
    `split_file` (Karpathy's dataset_*.json) where the train/val/test splits come from."""
    fmt, source, root, entries, problems, splits = _read(Path(path), format, images, split_file)
    dataset = _finish(fmt, source, root, entries, problems, skip_missing)
    dataset.splits = splits
    return dataset


def read_entries(
    path: str | Path, format: str = "auto", images: str | Path | None = None
) -> tuple[str, Path, Path, list[Entry], list[str]]:
    """The caption entries of annotations in any supported format (gzip-compressed too), without looking
    at the images: (format, annotation file, image root, entries, problems). `load_dataset` and the
    caption datastore (which needs only the text) both read through here."""
    return _read(Path(path), format, images, None)[:5]


def _read(
    path: Path, format: str, images: str | Path | None, split_file: str | Path | None
) -> tuple[str, Path, Path, list[Entry], list[str], str]:
    """read_entries plus the splits: a Karpathy split file's when one is given or lies beside the
    annotations, else the annotations' own or a fixed rule; the last item says which, for the summary."""
    image_dir = Path(images) if images is not None else None
    fmt, data = _detect(path) if format == "auto" else (format, None)
    if fmt == "flickr":
        source, root, entries, problems, splits = _flickr(path, image_dir)
    elif fmt == "kaggle":
        source, root, entries, problems, splits = *_kaggle(path, image_dir), ""
    elif fmt == "karpathy":
        source, root, entries, problems = _karpathy(path, image_dir, data)
        splits = f"Karpathy's split file {source}"
    elif fmt == "coco":
        source, root, entries, problems, splits = _coco(path, image_dir, data)
    elif fmt == "custom":
        source, root, entries, problems, splits = *_custom(path, image_dir), ""
    else:
        raise DatasetError(f"unknown dataset format {format!r}; expected auto, {', '.join(FORMATS)}")
    karpathy = Path(split_file) if split_file else _karpathy_file(fmt, path)
    if karpathy is not None and fmt != "karpathy":
        entries = _karpathy_splits(karpathy, entries, problems)
        splits = f"Karpathy's split file {karpathy}"
    if not splits and any(not e[2] for e in entries):
        splits = "none in the annotations: prepare assigns 90% train, 5% val, 5% test by a hash of each name"
    return fmt, source, root, entries, problems, splits


def _karpathy_file(fmt: str, path: Path) -> Path | None:
    """Karpathy's split file of this layout when it lies beside the annotations (or in COCO's
    annotations/ folder): a downloaded split file is used without being named."""
    name = KARPATHY_FILES.get(fmt)
    if name is None:
        return None
    folder = path if path.is_dir() else path.parent
    places = [folder, folder / "annotations"]
    if folder.name in ("annotations", "flickr30k_images"):  # --data coco/annotations; Kaggle's Flickr30k folder
        places.append(folder.parent)
    found = [place / name for place in places if (place / name).is_file()]
    return found[0] if found else None


def _karpathy_splits(file: Path, entries: list[Entry], problems: list[str]) -> list[Entry]:
    """The entries with the splits of Karpathy's file, matched by file name or (COCO) by the image id
    that ends both 2014 and 2017 file names, so dataset_coco.json splits the 2017 layout too; entries in
    none of its splits are left out, and said so."""
    data = _read_json(file)
    by_name: dict[str, str] = {}
    by_id: dict[int, str] = {}
    for i, image in enumerate(_get(data, "images", str(file))):
        where = f"{file}: images[{i}]"
        split = _split_name(_get(image, "split", where), f"{where}.split")
        by_name[_get(image, "filename", where)] = split
        if isinstance(image.get("cocoid"), int):
            by_id[image["cocoid"]] = split
    out: list[Entry] = []
    unmatched: list[str] = []
    for name, captions, _, where in entries:
        base = name.rsplit("/", 1)[-1]
        found = by_name.get(base)
        if found is None and by_id:
            number = re.search(r"(\d+)\.\w+$", base)
            found = by_id.get(int(number.group(1))) if number else None
        if found is None:
            unmatched.append(name)
        else:
            out.append((name, captions, found, where))
    if entries and not out:
        raise DatasetError(f"{file}: names none of the {len(entries)} images of the annotations; is it the split "
                           "file of this dataset?")
    if unmatched:
        problems.append(f"{file}: {len(unmatched)} images in none of its splits left out: {_some(unmatched)}")
    return out


def _detect(path: Path) -> tuple[str, Any]:
    """The format, and the parsed JSON when `path` is a JSON file, so a large file is read only once."""
    if path.is_dir():
        if _token_file(path):
            return "flickr", None
        if _has_kaggle_header(path / "captions.txt"):
            return "kaggle", None
        if _flickr30k_csv(path) is not None:
            return "flickr", None
        if (path / "captions.csv").is_file() or (path / "captions.jsonl").is_file():
            return "custom", None
        if _coco_layout(path):  # before dataset_*.json: a dataset_coco.json beside it gives the splits
            return "coco", None
        if any(path.glob("dataset_*.json")):
            return "karpathy", None
        if any(path.glob("captions_*.json")):
            return "coco", None
        raise DatasetError(f"{path}: cannot tell the dataset format; looked for {_LOOKED_FOR}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file or folder")
    name = path.name.removesuffix(".gz")  # a compressed file is read as what it holds
    suffix = Path(name).suffix
    if suffix == ".json":
        data = _read_json(path)
        if isinstance(data, dict) and "annotations" in data:
            return "coco", data
        first = (data.get("images") or [None])[0] if isinstance(data, dict) else None
        if isinstance(first, dict) and "sentences" in first:
            return "karpathy", data
        raise DatasetError(f"{path}: neither COCO ('annotations') nor Karpathy ('images' with 'sentences') JSON")
    if name.endswith((".token", ".token.txt")):
        return "flickr", None
    if _has_kaggle_header(path):
        return "kaggle", None
    if _has_flickr30k_header(path):
        return "flickr", None
    if suffix in (".csv", ".jsonl"):
        return "custom", None
    raise DatasetError(f"{path}: cannot tell the dataset format; looked for {_LOOKED_FOR}")


def _finish(
    fmt: str, source: Path, root: Path, entries: list[Entry], problems: list[str], skip_missing: bool
) -> Dataset:
    """Merge entries per image (in first-seen order), drop empty captions, and check the files exist."""
    root = root.resolve()
    merged: dict[str, tuple[list[str], str]] = {}
    first_seen: dict[str, str] = {}
    empty: list[str] = []
    for name, captions, split, where in entries:
        first_seen.setdefault(name, where)
        kept, _ = merged.setdefault(name, ([], split))
        for caption in captions:
            if not isinstance(caption, str):
                raise DatasetError(f"{where}: caption is not a string: {caption!r}")
            if caption.strip():
                kept.append(caption.strip())
            else:
                empty.append(where)
    if empty:
        problems.append(f"{len(empty)} empty captions dropped, first at {empty[0]}")
    bare = [name for name, (captions, _) in merged.items() if not captions]
    if bare:
        problems.append(f"{len(bare)} images with no captions dropped: {_some(bare)}")
    records = [Record(root / name, tuple(caps), split, root) for name, (caps, split) in merged.items() if caps]
    missing = [r.image for r in records if not r.image.is_file()]
    if missing:
        listed = _listed([f"{r.image} ({_line(first_seen[r.name], source)})" for r in records
                          if not r.image.is_file()], "; ")
    if missing and not skip_missing:
        raise DatasetError(
            f"{len(missing)} of {len(records)} images listed in {source} are missing: {listed}; "
            f"fix the paths (images are looked for in {root}) or pass --skip-missing"
        )
    if missing:
        problems.append(f"{len(missing)} missing images skipped: {listed}")
        absent = set(missing)
        records = [r for r in records if r.image not in absent]
    return Dataset(records, fmt, missing, problems)


def _line(where: str, source: Path) -> str:
    """`where` without the annotation file's name that the message already gives: "line 7", "images[3]"."""
    short = where.removeprefix(f"{source}:").strip()
    return f"line {short}" if short.isdigit() else short


def _listed(items: list[str], sep: str) -> str:
    """The first MAX_REPORTED items, then how many more: a long list of faults fits one message."""
    more = len(items) - MAX_REPORTED
    return sep.join(items[:MAX_REPORTED]) + (f"{sep}and {more} more" if more > 0 else "")


def _flickr(path: Path, images: Path | None) -> tuple[Path, Path, list[Entry], list[str], str]:
    """Flickr8k's and Flickr30k's token files (NAME.jpg#N<TAB>caption), or the pipe-separated results.csv of
    Flickr30k's Kaggle copy; splits from Flickr8k's split files, else (Flickr30k) from Karpathy's file or
    FLICKR30K_HELD_OUT's rule, else none (prepare's hash rule)."""
    token = path if path.is_file() else _token_file(path) or _flickr30k_csv(path)
    if token is None:
        raise DatasetError(f"{path}: no Flickr token file (Flickr8k.token.txt, *.token.txt or *.token) or "
                           "Flickr30k results.csv")
    csv_file = _has_flickr30k_header(token)
    folder = token.parent if csv_file or path.is_file() else path  # results.csv may sit in flickr30k_images/
    problems: list[str] = []
    entries = _flickr30k_csv_entries(token, problems) if csv_file else _token_entries(token)
    flickr30k = csv_file or token.name.startswith("results_")
    split_of: dict[str, str] = {}
    for pattern, split in (("*trainImages.txt", "train"), ("*devImages.txt", "val"), ("*testImages.txt", "test")):
        for split_file in sorted(folder.glob(pattern)):
            split_of.update((name, split) for name in _read_text(split_file).split())
    root = images or _first_dir(folder, _IMAGE_DIRS) or folder
    splits = "Flickr8k's split files (*trainImages.txt, *devImages.txt, *testImages.txt)" if split_of else ""
    if split_of:  # only split images are used; the rest are reported, typos (no such file) apart
        names = dict.fromkeys(e[0] for e in entries)
        unsplit = [name for name in names if name not in split_of]
        typos = [name for name in unsplit if not (root / name).is_file()]
        if typos:
            problems.append(
                f"{token}: {len(typos)} names are neither image files nor in a split, dropped: {_some(typos)}"
            )
        if len(unsplit) > len(typos):
            left_out = [name for name in unsplit if name not in typos]
            problems.append(f"{token}: {len(left_out)} images in no split file left out: {_some(left_out)}")
        uncaptioned = sorted(split_of.keys() - names.keys())
        if uncaptioned:
            problems.append(f"{token}: {len(uncaptioned)} images in split files have no captions: {_some(uncaptioned)}")
        entries = [(name, caps, split_of[name], where) for name, caps, _, where in entries if name in split_of]
    elif flickr30k and _karpathy_file("flickr", path) is None:
        entries, splits = _flickr30k_rule(entries)
    return token, root, entries, problems, splits


def _token_entries(token: Path) -> list[Entry]:
    entries: list[Entry] = []
    for lineno, line in enumerate(_read_text(token).splitlines(), 1):
        if not line.strip():
            continue
        key, tab, caption = line.partition("\t")
        name, _, _ = key.rpartition("#")
        if not tab or not name:
            raise DatasetError(f"{token}:{lineno}: expected 'NAME.jpg#N<TAB>caption', got {line[:80]!r}")
        entries.append((name.strip(), [caption], "", f"{token}:{lineno}"))
    return entries


def _flickr30k_csv_entries(file: Path, problems: list[str]) -> list[Entry]:
    """Kaggle's Flickr30k results.csv: 'image_name| comment_number| comment'. Its one known broken row
    (a '|' missing) and any like it are left out and reported, not fatal: the other 158,914 are fine."""
    entries: list[Entry] = []
    bad: list[str] = []
    for lineno, line in enumerate(_read_text(file).splitlines()[1:], 2):
        if not line.strip():
            continue
        parts = line.split("|", 2)
        if len(parts) != 3 or not parts[0].strip():
            bad.append(str(lineno))
            continue
        entries.append((parts[0].strip(), [parts[2]], "", f"{file}:{lineno}"))
    if bad:
        problems.append(f"{file}: {len(bad)} lines without 'image| number| caption' left out: lines {_some(bad)}")
    return entries


def _flickr30k_rule(entries: list[Entry]) -> tuple[list[Entry], str]:
    """Flickr30k without a split file: the images sorted by file name, the first min(1000, n // 10)
    test, the next as many val, the rest train (Karpathy's sizes)."""
    names = sorted({e[0] for e in entries})
    held = min(FLICKR30K_HELD_OUT, len(names) // 10)
    split_of = {n: "test" if i < held else "val" if i < 2 * held else "train" for i, n in enumerate(names)}
    rule = (f"no Karpathy split file ({KARPATHY_FILES['flickr']}); the {len(names)} images sorted by file name: "
            f"the first {held} test, the next {held} val, the other {len(names) - 2 * held} train")
    return [(name, caps, split_of[name], where) for name, caps, _, where in entries], rule


def _kaggle(path: Path, images: Path | None) -> tuple[Path, Path, list[Entry], list[str]]:
    file = path if path.is_file() else path / "captions.txt"
    problems: list[str] = []
    entries = _csv_entries(file, problems)
    return file, images or _first_dir(file.parent, ("Images", "images")) or file.parent, entries, problems


def _custom(path: Path, images: Path | None) -> tuple[Path, Path, list[Entry], list[str]]:
    candidates = [path] if path.is_file() else [path / "captions.csv", path / "captions.jsonl"]
    file = next((f for f in candidates if f.is_file()), None)
    if file is None:
        raise DatasetError(f"{path}: no captions.csv or captions.jsonl")
    problems: list[str] = []
    jsonl = file.name.removesuffix(".gz").endswith(".jsonl")
    entries = _jsonl_entries(file, problems) if jsonl else _csv_entries(file, problems)
    return file, images or _first_dir(file.parent, ("images",)) or file.parent, entries, problems


def _karpathy(path: Path, images: Path | None, data: Any) -> tuple[Path, Path, list[Entry], list[str]]:
    if path.is_dir():
        files = sorted(path.glob("dataset_*.json"))
        if len(files) != 1:
            raise DatasetError(f"{path}: expected one dataset_*.json, found {len(files)}; pass the file itself")
        path = files[0]
    if data is None:
        data = _read_json(path)
    entries: list[Entry] = []
    for i, image in enumerate(_get(data, "images", str(path))):
        where = f"{path}: images[{i}]"
        name = _get(image, "filename", where)
        filepath = image.get("filepath", "")
        split = _split_name(_get(image, "split", where), f"{where}.split")
        captions = [_get(s, "raw", f"{where}.sentences[{j}]") for j, s in enumerate(_get(image, "sentences", where))]
        entries.append((f"{filepath}/{name}" if filepath else name, captions, split, where))
    return path, images or _first_dir(path.parent, _IMAGE_DIRS) or path.parent, entries, []


def _coco(path: Path, images: Path | None, data: Any) -> tuple[Path, Path, list[Entry], list[str], str]:
    """COCO caption files: one file, a folder of captions_*.json, or COCO's own layout (annotations/ beside
    train2017/ and val2017/, or the 2014 names). The split comes from each file's name; without a test
    file the val images are split by COCO_HELD_OUT's rule (Karpathy's split file, when found, overrides it)."""
    layout = _coco_layout(path) if path.is_dir() else []
    files = [path] if path.is_file() else layout or sorted(path.glob("captions_*.json"))
    if not files:
        raise DatasetError(f"{path}: no captions_*.json files")
    root = images or (path if layout else files[0].parent)
    if images is None and root.name == "annotations" and _image_subdirs(root.parent, files):
        root = root.parent  # --data coco/annotations: the image folders sit beside it
    entries: list[Entry] = []
    ids: dict[str, Any] = {}
    problems: list[str] = []
    for file in files:
        content = data if data is not None and file == path else _read_json(file)
        match = re.search(r"train|val|test", file.stem)
        split = _SPLIT_NAMES[match.group()] if match else ""
        subdir = file.stem.removeprefix("captions_")  # captions_val2014.json -> images in val2014/
        prefix = f"{subdir}/" if subdir != file.stem and (root / subdir).is_dir() else ""
        names: dict[Any, str] = {}
        for i, image in enumerate(_get(content, "images", str(file))):
            where = f"{file}: images[{i}]"
            names[_get(image, "id", where)] = prefix + _get(image, "file_name", where)
        captions: dict[Any, list[Any]] = {image_id: [] for image_id in names}
        orphans = 0
        for i, annotation in enumerate(_get(content, "annotations", str(file))):
            where = f"{file}: annotations[{i}]"
            image_id, caption = _get(annotation, "image_id", where), _get(annotation, "caption", where)
            if image_id in captions:
                captions[image_id].append(caption)
            else:
                orphans += 1
        if orphans:
            problems.append(f"{file}: {orphans} annotations name an image_id missing from 'images'; ignored")
        entries += [(names[i], caps, split, f"{file}: image id {i}") for i, caps in captions.items()]
        ids.update((names[i], i) for i in captions)
    splits = "the annotation files' names (captions_train*, captions_val*, captions_test*)"
    if not any(e[2] == "test" for e in entries) and any(e[2] == "val" for e in entries):
        entries, splits = _coco_rule(entries, ids)
    return path, root, entries, problems, splits


def _coco_rule(entries: list[Entry], ids: dict[str, Any]) -> tuple[list[Entry], str]:
    """COCO without a test split: the val images with captions, sorted by image id, the first
    min(5000, n // 2) test, the next min(5000, rest) val, the others train (Karpathy's sizes, not his images)."""
    val = sorted({e[0] for e in entries if e[2] == "val" and e[1]},
                 key=lambda name: (0, ids[name], "") if isinstance(ids[name], int) else (1, 0, str(ids[name])))
    test = min(COCO_HELD_OUT, len(val) // 2)
    keep = min(COCO_HELD_OUT, len(val) - test)
    split_of = {name: "test" if i < test else "val" if i < test + keep else "train" for i, name in enumerate(val)}
    rule = (f"no Karpathy split file ({KARPATHY_FILES['coco']}); the {len(val)} val images sorted by image id: "
            f"the first {test} test, the next {keep} val, the other {len(val) - test - keep} train")
    return [(name, caps, split_of.get(name, split), where) for name, caps, split, where in entries], rule


def _coco_layout(folder: Path) -> list[Path]:
    """The caption files of COCO's own layout under `folder`: annotations/captions_{train,val}20xx.json
    beside the image folders they name (train2017/, val2014/, ...); [] for any other folder."""
    files = sorted((folder / "annotations").glob("captions_*.json"))
    return files if files and _image_subdirs(folder, files) else []


def _image_subdirs(folder: Path, files: list[Path]) -> bool:
    """Whether `folder` holds an image folder named after one of the caption files (captions_val2014.json:
    val2014/)."""
    return any((folder / f.stem.removeprefix("captions_")).is_dir() for f in files)


def _flickr30k_csv(folder: Path) -> Path | None:
    """Kaggle's Flickr30k results.csv in `folder` or in its flickr30k_images/ subfolder."""
    for file in (folder / "results.csv", folder / "flickr30k_images" / "results.csv"):
        if _has_flickr30k_header(file):
            return file
    return None


def _has_flickr30k_header(file: Path) -> bool:
    if not file.is_file():
        return False
    with open(file, encoding="utf-8-sig", errors="replace") as f:
        return f.readline().replace(" ", "").lower().startswith("image_name|")


def _csv_entries(file: Path, problems: list[str] | None = None) -> list[Entry]:
    """Rows of a csv with the columns image and caption (split optional). Every bad row is found in one
    pass and reported together, so a hand-made file is fixed in one round, not one error per run."""
    reader = csv.reader(io.StringIO(_read_text(file), newline=""))
    entries: list[Entry] = []
    bad: list[str] = []
    seen = _Repeats(file)
    try:
        header = [h.strip().lower() for h in next(reader, [])]
        if "image" not in header or "caption" not in header:
            raise DatasetError(
                f"{file}:1: the header must name the columns image and caption, got {','.join(header)!r}"
            )
        column = {h: i for i, h in enumerate(header)}
        for row in reader:
            where = f"{file}:{reader.line_num}"
            if not row:
                continue
            if len(row) != len(header):
                bad.append(f"{where}: expected {len(header)} fields, got {len(row)}; quote captions containing commas")
                continue
            try:
                split = _split_name(row[column["split"]], where) if "split" in column else ""
            except DatasetError as err:
                bad.append(str(err))
                continue
            if not row[column["image"]].strip():
                bad.append(f"{where}: no image name")
            elif not seen.repeated(tuple(row), reader.line_num):
                entries.append((row[column["image"]].strip(), [row[column["caption"]]], split, where))
    except csv.Error as e:
        bad.append(f"{file}:{reader.line_num}: {e} (reading stopped here)")
    _raise_bad_lines(file, bad)
    seen.report(problems)
    return entries


def _jsonl_entries(file: Path, problems: list[str] | None = None) -> list[Entry]:
    """One JSON object per line: {"image": "a.jpg", "caption": "..."} or {"image": ..., "captions": [...]},
    with "split" optional. Every bad line is found in one pass, as in _csv_entries."""
    entries: list[Entry] = []
    bad: list[str] = []
    seen = _Repeats(file)
    for lineno, line in enumerate(_read_text(file).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"{where}: invalid JSON: {e.msg}")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not row["image"].strip():
            bad.append(f"{where}: expected an object with an 'image' string")
            continue
        captions = [row["caption"]] if "caption" in row else row.get("captions")
        if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
            bad.append(f"{where}: expected 'caption' (a string) or 'captions' (a list of strings)")
            continue
        try:
            split = _split_name(row.get("split") or "", where)
        except DatasetError as err:
            bad.append(str(err))
            continue
        if not seen.repeated(line.strip(), lineno):
            entries.append((row["image"].strip(), captions, split, where))
    _raise_bad_lines(file, bad)
    seen.report(problems)
    return entries


class _Repeats:
    """Exact repeats of an earlier line: a pasted block twice over would count its captions twice as
    references. Repeats are dropped and reported as problems with both line numbers."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.first: dict[Any, int] = {}
        self.found: list[str] = []

    def repeated(self, key: Any, lineno: int) -> bool:
        first = self.first.setdefault(key, lineno)
        if first != lineno:
            self.found.append(f"line {lineno} repeats line {first}")
        return first != lineno

    def report(self, problems: list[str] | None) -> None:
        if self.found and problems is not None:
            problems.append(f"{self.file}: {len(self.found)} exact duplicate lines dropped: "
                            f"{_listed(self.found, ', ')}")


def _raise_bad_lines(file: Path, bad: list[str]) -> None:
    if bad:
        raise DatasetError(f"{file}: {len(bad)} bad line{'s' if len(bad) > 1 else ''}, fix them and run again:\n  "
                           + _listed(bad, "\n  "))


def _token_file(folder: Path) -> Path | None:
    for name in ("Flickr8k.token.txt", "results_20130124.token"):
        if (folder / name).is_file():
            return folder / name
    # Flickr8k ships Flickr8k.lemma.token.txt beside the raw captions; lemmatised text is not a reference
    found = sorted(p for p in [*folder.glob("*.token.txt"), *folder.glob("*.token")] if "lemma" not in p.name)
    return found[0] if found else None


def _has_kaggle_header(file: Path) -> bool:
    if not file.is_file():
        return False
    with open(file, encoding="utf-8-sig", errors="replace") as f:
        return f.readline().strip().replace(" ", "").lower() == "image,caption"


def _first_dir(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_dir()), None)


def _split_name(value: Any, where: str) -> str:
    split = _SPLIT_NAMES.get(str(value).strip().lower())
    if split is None:
        raise DatasetError(f"{where}: unknown split {value!r}; expected train, val, test, dev, restval or empty")
    return split


def _get(obj: Any, key: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise DatasetError(f"{where}: missing {key!r}")
    return obj[key]


def _read_text(file: Path) -> str:
    try:
        if file.name.endswith(".gz"):
            return gzip.decompress(file.read_bytes()).decode("utf-8-sig")
        return file.read_text(encoding="utf-8-sig")  # -sig: csv files saved by spreadsheets start with a BOM
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DatasetError(f"{file}: cannot read: {e}") from e


def _read_json(file: Path) -> Any:
    try:
        return json.loads(_read_text(file))
    except json.JSONDecodeError as e:
        raise DatasetError(f"{file}:{e.lineno}: invalid JSON: {e.msg}") from e


def _some(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def load_image(source: str | Path | bytes | Image.Image | np.ndarray, max_pixels: int | None = None,
               name: str | None = None) -> Image.Image:
    """Any image as a fully decoded RGB PIL image, upright; anything unusable raises ImageError naming it
    (by `name` when given, e.g. an upload's file name, else by its path or kind).

    `max_pixels` refuses larger images from their header, before any pixels are decoded, which is what
    protects a server from decompression bombs; PIL's own bomb warning also becomes an ImageError.
    """
    if name is None and isinstance(source, (str, Path)):
        name = str(source)
    elif name is None and isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "<image>"
    elif name is None:
        name = "<bytes>" if isinstance(source, bytes) else "<array>"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = _open(source, name)
            try:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is more than the limit of "
                                        f"{max_pixels} (max_pixels)")
                image.load()  # decode now, so a truncated file fails here rather than in a data loader
                return _to_rgb(ImageOps.exif_transpose(image))
            finally:
                if image is not source:
                    image.close()
    except ImageError:
        raise
    except FileNotFoundError as e:
        if str(source).startswith(("http://", "https://", "http:/", "https:/")):  # a Path folds the double slash
            raise ImageError(f"{name}: URLs are not fetched; download the photo first (curl -O URL)") from e
        raise ImageError(f"{name}: no such file") from e
    except _BOMB as e:
        raise ImageTooLarge(f"{name}: {e}") from e
    except UnidentifiedImageError as e:
        empty = source == b"" or (isinstance(source, (str, Path)) and os.path.getsize(source) == 0)
        raise ImageError(f"{name}: {'empty file' if empty else 'not an image, or a format Pillow cannot read'}") from e
    except _DECODE_ERRORS as e:
        raise ImageError(f"{name}: cannot read image: {e}") from e


def _open(source: str | Path | bytes | Image.Image | np.ndarray, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
    if not isinstance(source, (str, Path, bytes)):  # Pillow would fail later with an AttributeError
        raise TypeError(f"load_image takes a path (str or Path), the bytes of an image file, a PIL image or a "
                        f"numpy array; got {type(source).__name__}")
    kind = format_of(source, name)
    if isinstance(source, (str, Path)) and not os.path.exists(source):
        raise FileNotFoundError(source)  # "no such file", not a missing extra's install command
    if kind == "raw":
        return _open_raw(source, name)
    if kind == "heif":
        _register_heif(name)
    elif kind == "avif" and not features.check("avif"):
        raise ImageError(f"{name}: this Pillow cannot read AVIF (its wheels can from 11.3 on): "
                         ".venv/bin/pip install -U 'pillow>=11.3'")
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def format_of(source: str | Path | bytes, name: str) -> str:
    """"raw", "heif", "avif" or "" (anything else, left to Pillow): which reader a file needs. RAW goes by its
    suffix (most RAW formats are TIFF inside, which Pillow would misread), HEIF and AVIF by their ftyp brand,
    so a misnamed iPhone photo is read too, else by suffix; bytes go by `name` (an upload's file name)."""
    suffix = os.path.splitext(name if isinstance(source, bytes) else os.fspath(source))[1].lower()
    if suffix in RAW_SUFFIXES:
        return "raw"
    head = source[:16] if isinstance(source, bytes) else _head(source)
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"crx ":  # Canon CR3 is ISO media too
            return "raw"
        if brand in _HEIF_BRANDS:
            return "heif"
        if brand in (b"avif", b"avis"):
            return "avif"
    return "heif" if suffix in HEIF_SUFFIXES else "avif" if suffix == ".avif" else ""


def _head(path: str | Path) -> bytes:
    """A file's first bytes; b"" where it cannot be read (opening it again reports why)."""
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError:
        return b""


def _register_heif(name: str) -> None:
    """Teach Pillow HEIF on the first HEIC met, not at import: pillow-heif is an extra, and its import costs time
    every run that has no HEIC."""
    global _heif_registered
    with _heif_lock:  # bulk captioning reads images on several threads
        if _heif_registered:
            return
        try:
            import pillow_heif
        except ImportError:
            raise ImageError(f"{name}: reading HEIC/HEIF needs pillow-heif: {install_hint('heif')}") from None
        pillow_heif.register_heif_opener()
        _heif_registered = True


def _open_raw(source: str | Path | bytes, name: str) -> Image.Image:
    """A camera RAW as its embedded preview JPEG, turned upright: previews are full-size or close to it on
    current cameras and take milliseconds to read, where demosaicing the sensor data takes a second or more.
    A RAW without a usable preview (or a small one) is decoded in full by LibRaw, which turns it upright itself."""
    try:
        import rawpy
    except ImportError:
        raise ImageError(f"{name}: reading camera RAW files needs rawpy: {install_hint('raw')}") from None
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name}: empty file")
        stream: Any = io.BytesIO(source)
    else:
        if os.path.getsize(source) == 0:  # FileNotFoundError for a missing file, reported as such
            raise ImageError(f"{name}: empty file")
        stream = os.fspath(source)
    try:
        with rawpy.imread(stream) as raw:
            flip = raw.sizes.flip
            try:
                thumb = raw.extract_thumb()
            except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
                thumb = None
            image: Image.Image | None = None
            if thumb is not None and thumb.format == rawpy.ThumbFormat.JPEG:
                image = Image.open(io.BytesIO(bytes(thumb.data)))  # bytes for a JPEG: no copy
                image.load()
            elif thumb is not None and thumb.format == rawpy.ThumbFormat.BITMAP:
                image = Image.fromarray(np.asarray(thumb.data))
            if image is None or min(image.size) < MIN_RAW_PREVIEW:
                return Image.fromarray(raw.postprocess(use_camera_wb=True, half_size=True))
            if image.getexif().get(_ORIENTATION, 1) not in (0, 1):
                # a preview JPEG with an EXIF orientation (its own, or the RAW's, which LibRaw writes into a
                # preview without EXIF) is turned by load_image's exif_transpose, and only by that
                return image
    except rawpy.LibRawError as err:
        reason = err.args[0] if err.args else type(err).__name__  # LibRaw's messages come as bytes
        reason = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        raise ImageError(f"{name}: cannot read RAW file: {reason}") from err
    return image.transpose(_RAW_FLIP[flip]) if flip in _RAW_FLIP else image


def _from_array(a: np.ndarray, name: str) -> Image.Image:
    """HxW, HxWx1, HxWx3 or HxWx4 arrays of uint8, uint16 (full range), bool, or float in [0, 1]."""
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.size == 0 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
        raise ImageError(f"{name}: expected an HxW, HxWx3 or HxWx4 array, got shape {a.shape}")
    if a.dtype == np.uint16:
        a = np.round(a / 257)
    elif a.dtype == np.bool_:
        a = a * 255
    elif a.dtype.kind == "f":
        low, high = float(a.min()), float(a.max())
        # resampling overshoot is clipped; anything further is a 0-255 or mean-normalised array
        if not (np.isfinite(low) and np.isfinite(high)) or low < -0.5 or high > 1.5:
            raise ImageError(f"{name}: float pixels must lie in [0, 1], got {low:.3g} to {high:.3g}")
        a = np.round(np.clip(a, 0, 1) * 255)
    elif a.dtype != np.uint8:
        raise ImageError(f"{name}: unsupported dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composited over white, as image viewers show it."""
    if image.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit samples: 65535 -> 255 by dividing by 257; Image.convert would clip everything above 255
        image = Image.fromarray(np.round(np.clip(np.asarray(image), 0, 65535) / 257).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
