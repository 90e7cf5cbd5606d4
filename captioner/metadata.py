"""Captions into the photos' own metadata, where photo managers (digiKam, Lightroom, darktable, the Windows
and macOS file browsers) show and search them: `captioner write-metadata captions.jsonl --photos LIBRARY/`,
or `captioner caption LIBRARY/ --output captions.jsonl --write-metadata`, which runs the same code once the
library is captioned.

Each photo's best caption goes into XMP dc:description, IPTC Caption-Abstract and EXIF ImageDescription; its
concepts join its keywords (XMP dc:subject, IPTC Keywords). Exiv2 does the writing (through pyexiv2, whose
wheel bundles it, so `pip install 'captioner[metadata]'` is the whole install; ExifTool would need Perl and a
system package). Exiv2 rewrites the metadata segments only: the compressed image data is copied byte for byte.

- atomic: a photo is copied beside itself (NAME.tmp), the copy edited, then renamed over it (atomic.py), so a
  kill leaves every photo either untouched or complete.
- careful: a photo with a description of its own keeps it, unless `overwrite`.
- resumable: a photo whose description already is its caption is not written again, so a rerun after a kill
  writes only the photos it had not reached.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from tqdm import tqdm

from .atomic import replace_file
from .bulk import captioned_library, library_path, read_lines
from .data import RAW_SUFFIXES

WRITABLE = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}  # Exiv2 reads BMP and GIF, but cannot write them
IPTC_UTF8 = "\x1b%G"  # IPTC's CharacterSet value for UTF-8
Outcome = Literal["written", "already_done", "kept"]


@dataclass
class MetadataSummary:
    """What one run did to the photos a JSONL lists."""

    written: int = 0
    already_done: int = 0  # their description already was their caption
    kept: int = 0  # had a description of their own
    unsupported: int = 0  # in a format Exiv2 cannot write
    failed: int = 0  # missing, unreadable or unwritable, each reported


@dataclass
class Current:
    """A photo's metadata as found, before writing."""

    description: str  # the first non-blank of XMP, EXIF and IPTC; "" when none
    keywords: list[str]
    iptc_charset: bool  # whether its IPTC names a character set (then it is left as it is)


def exiv2() -> ModuleType:
    """pyexiv2, imported only when metadata is written: the core install does not need it."""
    try:
        import pyexiv2
    except ImportError as err:
        raise ImportError("writing captions into photos needs pyexiv2: pip install 'captioner[metadata]'") from err
    return pyexiv2


def as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def read_current(path: Path) -> Current:
    with exiv2().Image(str(path)) as image:
        xmp, exif, iptc = image.read_xmp(), image.read_exif(), image.read_iptc()
    xmp_description = xmp.get("Xmp.dc.description", "")
    if isinstance(xmp_description, dict):  # a language alternative: the default language, else the first
        xmp_description = xmp_description.get('lang="x-default"', next(iter(xmp_description.values()), ""))
    found = [xmp_description, exif.get("Exif.Image.ImageDescription", ""), iptc.get("Iptc.Application2.Caption", "")]
    keywords = as_list(xmp.get("Xmp.dc.subject")) + as_list(iptc.get("Iptc.Application2.Keywords"))
    return Current(next((d.strip() for d in found if isinstance(d, str) and d.strip()), ""),
                   list(dict.fromkeys(keywords)), "Iptc.Envelope.CharacterSet" in iptc)


def as_bag(image: Any) -> None:
    """pyexiv2 writes every XMP list as an ordered rdf:Seq; the XMP standard (and Lightroom and digiKam) have
    dc:subject as an unordered rdf:Bag, so the packet is mended to that."""
    packet = image.read_raw_xmp()
    mended = re.sub(r"(<dc:subject>\s*<rdf:)Seq(>.*?</rdf:)Seq(>)", r"\1Bag\2Bag\3", packet, flags=re.DOTALL)
    if mended != packet:
        image.modify_raw_xmp(mended)


def write_photo(path: Path, caption: str, keywords: list[str], overwrite: bool = False,
                keep_mtime: bool = False) -> Outcome:
    """Put the caption and keywords into one photo, atomically; a photo that has this caption already, or
    (without `overwrite`) a description of its own, is left as it is."""
    current = read_current(path)
    if current.description == caption:
        return "already_done"
    if current.description and not overwrite:
        return "kept"
    before = path.stat()
    subjects = list(dict.fromkeys(current.keywords + keywords))  # the photo's own keywords stay, first

    def write(tmp: Path) -> None:
        shutil.copy2(path, tmp)  # with its permissions
        with exiv2().Image(str(tmp)) as image:
            iptc: dict = {"Iptc.Application2.Caption": caption}
            if subjects:
                iptc["Iptc.Application2.Keywords"] = subjects
            if not current.iptc_charset:
                iptc["Iptc.Envelope.CharacterSet"] = IPTC_UTF8
            image.modify_iptc(iptc)  # formats without IPTC (WebP) drop it
            image.modify_exif({"Exif.Image.ImageDescription": caption})
            xmp: dict = {"Xmp.dc.description": {'lang="x-default"': caption}}
            if subjects:
                xmp["Xmp.dc.subject"] = subjects
            image.modify_xmp(xmp)
            as_bag(image)
        if keep_mtime:
            os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))

    replace_file(path, write)
    return "written"


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def write_library(jsonl: str | Path, photos: str | Path, overwrite: bool = False, keep_mtime: bool = False,
                  progress: bool = True) -> MetadataSummary:
    """Write each captioned photo of a bulk JSONL (`photos` is the folder its paths are relative to). Photos
    in formats that cannot hold a description, and those that cannot be written, are reported by name and
    skipped."""
    exiv2()  # a missing package fails here, before any photo
    jsonl, photos = captioned_library(jsonl, photos)
    summary = MetadataSummary()

    def report(message: str) -> None:
        tqdm.write(f"skipped {message}", file=sys.stderr)  # above the progress bar, not through it

    with tqdm(total=count_lines(jsonl), unit="photo", desc="metadata", disable=not progress,
              mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True) as bar:
        for _, _, record in read_lines(jsonl):
            bar.update(1)
            key, captions = record["file"], record.get("captions")
            if not captions:  # a file captioning could not read: nothing to write
                continue
            try:
                path = library_path(photos, key)
                if path.suffix.lower() in RAW_SUFFIXES:  # Exiv2 could write some; a camera original is not touched
                    report(f"{key}: {path.suffix.lstrip('.').upper()} files are camera originals and are left as "
                           "the camera wrote them")
                    summary.unsupported += 1
                    continue
                if path.suffix.lower() not in WRITABLE:
                    report(f"{key}: {path.suffix.lstrip('.').upper() or 'this'} files cannot hold a description "
                           "(Exiv2 cannot write them)")
                    summary.unsupported += 1
                    continue
                outcome = write_photo(path, captions[0]["generated_text"],
                                      [c["word"] for c in record.get("concepts", [])], overwrite, keep_mtime)
            except (OSError, RuntimeError, ValueError) as err:  # pyexiv2 raises RuntimeError for Exiv2's errors
                report(f"{key}: cannot write its metadata: {err}")
                summary.failed += 1
                continue
            setattr(summary, outcome, getattr(summary, outcome) + 1)
    return summary
