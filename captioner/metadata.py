"""Captions into the photos' own metadata, where photo managers (digiKam, Lightroom, darktable, the Windows
and macOS file browsers) show and search them: `captioner write-metadata captions.jsonl --photos LIBRARY/`,
or `captioner caption LIBRARY/ --output captions.jsonl --write-metadata`, which runs the same code once the
library is captioned.

Each photo's best caption goes into XMP dc:description, IPTC Caption-Abstract and EXIF ImageDescription; its
concepts join its keywords (XMP dc:subject, IPTC Keywords). Exiv2 does the writing (through pyexiv2, whose
wheel bundles it, so the `metadata` extra is the whole install; ExifTool would need Perl and a
system package). Exiv2 rewrites the metadata segments only: the compressed image data is copied byte for byte.

- atomic: a photo is copied beside itself (NAME.tmp), the copy edited, then renamed over it (atomic.py), so a
  kill leaves every photo either untouched or complete.
- careful: a photo with a description of its own keeps it, unless `overwrite`.
- resumable: a photo whose description already is its caption is not written again, so a rerun after a kill
  writes only the photos it had not reached.
- keywords always: a photo that keeps its own description still gets the concepts added to its keywords.
- one line a photo: a photo captioned twice (edited since, see bulk.py) is written from its last line only;
  lines the captioning could not read are counted; a `--photos` folder that holds none of the first photos
  the JSONL lists is refused up front (one line), not reported photo by photo.
- locked: the run holds NAME.jsonl.lock (bulk.output_lock), so two runs never write the same photos at once.
- no second captioning: writing into a photo changes its size and mtime, which bulk.py takes for an edit;
  so the lines of the photos written are brought to their new size and mtime (the JSONL rewritten
  atomically, under its lock, `refresh_states`), and the next `caption` run finds them done. (A search
  index of the JSONL then embeds its captions again, once.)

Sidecars (`--sidecar`): the caption and keywords go into an XMP file beside the photo, which is not touched;
the only way for camera RAW (left as the camera wrote them) and HEIC/AVIF (Exiv2 cannot write them). The
sidecar is named NAME.ext.xmp (`IMG_0001.CR2.xmp`): darktable writes and reads that name
(docs.darktable.org, "sidecar files"), and so does digiKam by default (its "read/write sidecar files"
setting, with NAME.xmp only under "sidecar file names compatible with commercial programs"). Lightroom
Classic writes NAME.xmp, and only for RAW files (it embeds into JPEG, TIFF and DNG). NAME.xmp was not
chosen because a camera's RAW+JPEG pair (IMG_0001.CR2 and IMG_0001.JPG) would share one sidecar, each
photo's caption overwriting the other's; NAME.ext.xmp keeps one sidecar a photo. A sidecar already there
(darktable's edit history, a rating, keywords) is merged: only dc:description and dc:subject change, its
own keywords stay first, and a description it holds is kept unless `overwrite`, as embedded ones are. A
photo without a sidecar yet starts one from its embedded description and keywords where Exiv2 reads them
(a photo manager reading the sidecar then still sees them). Each sidecar is written as NAME.ext.xmp.tmp
and renamed into place (atomic.py); a rerun finds the caption there and skips it.
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
from .bulk import captioned_library, file_state, json_line, last_lines, library_path, output_lock, read_lines
from .data import RAW_SUFFIXES
from .extras import install_hint

WRITABLE = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}  # Exiv2 reads BMP and GIF, but cannot write them
IPTC_UTF8 = "\x1b%G"  # IPTC's CharacterSet value for UTF-8
SIDECAR_SUFFIX = ".xmp"  # appended to the photo's whole name: IMG_0001.CR2.xmp (the module docstring says why)
# what a new sidecar starts as before Exiv2 adds the fields: an empty XMP packet
XMP_SKELETON = ('<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
                ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n </rdf:RDF>\n</x:xmpmeta>\n'
                '<?xpacket end="w"?>\n')
SAMPLE = 20  # lines whose photos are looked for before a run starts
Outcome = Literal["written", "already_done", "kept"]


@dataclass
class MetadataSummary:
    """What one run did to the photos a JSONL lists."""

    written: int = 0
    already_done: int = 0  # their description already was their caption
    kept: int = 0  # had a description of their own (their concepts were still added as keywords)
    unsupported: int = 0  # in a format Exiv2 cannot write
    failed: int = 0  # missing, unreadable or unwritable, each reported
    unread: int = 0  # the JSONL's error lines: files captioning could not read


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
        raise ImportError(f"writing captions into photos needs pyexiv2: {install_hint('metadata')}") from err
    return pyexiv2


def as_list(value: str | list[str] | None) -> list[str]:
    return [value] if isinstance(value, str) else list(value or [])


def xmp_description(xmp: dict) -> str:
    """dc:description of read XMP: a language alternative's default language, else its first."""
    found = xmp.get("Xmp.dc.description", "")
    if isinstance(found, dict):
        found = found.get('lang="x-default"', next(iter(found.values()), ""))
    return found.strip() if isinstance(found, str) else ""


def read_current(path: Path) -> Current:
    with exiv2().Image(str(path)) as image:
        xmp, exif, iptc = image.read_xmp(), image.read_exif(), image.read_iptc()
    found = [xmp_description(xmp), exif.get("Exif.Image.ImageDescription", ""),
             iptc.get("Iptc.Application2.Caption", "")]
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


def decide(current: Current, caption: str, keywords: list[str], overwrite: bool) -> tuple[Outcome, list[str], bool]:
    """What to do with one photo (or sidecar): the outcome, the keywords it ends with (its own first), and
    whether anything is to be written. One rule for photos and sidecars: a description that already is the
    caption is done; one of its own is kept unless `overwrite`, but the concepts still join the keywords."""
    subjects = list(dict.fromkeys(current.keywords + keywords))
    if current.description == caption:
        return "already_done", subjects, False
    if current.description and not overwrite:
        return "kept", subjects, subjects != current.keywords
    return "written", subjects, True


def write_photo(path: Path, caption: str, keywords: list[str], overwrite: bool = False,
                keep_mtime: bool = False) -> Outcome:
    """Put the caption and keywords into one photo, atomically; a photo that has this caption already is left
    as it is, and one with a description of its own (without `overwrite`) only gains the keywords."""
    current = read_current(path)
    outcome, subjects, change = decide(current, caption, keywords, overwrite)
    if not change:
        return outcome
    before = path.stat()
    describe = outcome == "written"

    def write(tmp: Path) -> None:
        shutil.copy2(path, tmp)  # with its permissions
        with exiv2().Image(str(tmp)) as image:
            iptc: dict = {"Iptc.Application2.Caption": caption} if describe else {}
            if subjects:
                iptc["Iptc.Application2.Keywords"] = subjects
            if not current.iptc_charset:
                iptc["Iptc.Envelope.CharacterSet"] = IPTC_UTF8
            image.modify_iptc(iptc)  # formats without IPTC (WebP) drop it
            if describe:
                image.modify_exif({"Exif.Image.ImageDescription": caption})
            xmp: dict = {"Xmp.dc.description": {'lang="x-default"': caption}} if describe else {}
            if subjects:
                xmp["Xmp.dc.subject"] = subjects
            image.modify_xmp(xmp)
            as_bag(image)
        if keep_mtime:
            os.utime(tmp, ns=(before.st_atime_ns, before.st_mtime_ns))

    replace_file(path, write)
    return outcome


def sidecar_path(photo: Path) -> Path:
    """The XMP sidecar of a photo: its whole name plus .xmp (IMG_0001.CR2 -> IMG_0001.CR2.xmp)."""
    return photo.with_name(photo.name + SIDECAR_SUFFIX)


def read_sidecar(path: Path) -> Current:
    """The description and keywords of an XMP sidecar."""
    with exiv2().Image(str(path)) as image:
        xmp = image.read_xmp()
    return Current(xmp_description(xmp), list(dict.fromkeys(as_list(xmp.get("Xmp.dc.subject")))), False)


def embedded(photo: Path) -> Current:
    """The photo's own description and keywords where Exiv2 reads them (most RAW and HEIC files too); none
    where it cannot: a sidecar is written all the same."""
    try:
        return read_current(photo)
    except (OSError, RuntimeError, ValueError):
        return Current("", [], False)


def write_sidecar(photo: Path, caption: str, keywords: list[str], overwrite: bool = False) -> Outcome:
    """Put the caption and keywords into the photo's XMP sidecar, merged into the one there (its other fields
    and keywords kept), written atomically; the photo itself is only read. Without a sidecar yet, the
    photo's embedded description and keywords count as the sidecar's (the module docstring)."""
    if not photo.is_file():
        raise FileNotFoundError(f"{photo}: no such file")
    sidecar = sidecar_path(photo)
    exists = sidecar.exists()
    own = embedded(photo)
    current = read_sidecar(sidecar) if exists else own
    if not current.description:
        current = Current(own.description, current.keywords, False)
    outcome, subjects, change = decide(current, caption, keywords, overwrite)
    if not change:
        return outcome

    def write(tmp: Path) -> None:
        if exists:
            shutil.copy2(sidecar, tmp)  # with its permissions
        else:
            tmp.write_text(XMP_SKELETON, encoding="utf-8")
        with exiv2().Image(str(tmp)) as image:
            xmp: dict = {"Xmp.dc.description": {'lang="x-default"': caption}} if outcome == "written" else {}
            if subjects:
                xmp["Xmp.dc.subject"] = subjects
            image.modify_xmp(xmp)
            as_bag(image)

    replace_file(sidecar, write)
    return outcome


def check_photos_there(jsonl: Path, photos: Path, sample: int = SAMPLE) -> None:
    """Refuse a `--photos` folder that holds none of the first `sample` photos the JSONL lists: a wrong
    folder is one line, not a failure a photo."""
    listed: list[str] = []
    for _, _, record in read_lines(jsonl):
        if record.get("captions"):
            listed.append(record["file"])
            if len(listed) == sample:
                break

    def there(key: str) -> bool:
        try:
            return library_path(photos, key).is_file()
        except ValueError:
            return False
    if listed and not any(there(key) for key in listed):
        raise FileNotFoundError(f"{photos}: holds none of the first {len(listed)} photos {jsonl.name} lists (such as "
                                f"{listed[0]}); give --photos the folder it captioned")


def count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def write_library(jsonl: str | Path, photos: str | Path, overwrite: bool = False, keep_mtime: bool = False,
                  progress: bool = True, sidecar: bool = False, wait: bool = False) -> MetadataSummary:
    """Write each captioned photo of a bulk JSONL (`photos` is the folder its paths are relative to), or
    with `sidecar` its XMP sidecar. Photos in formats that cannot hold a description, and those that cannot
    be written, are reported by name and skipped. A file's last line is its caption (bulk.last_lines)."""
    exiv2()  # a missing package fails here, before any photo
    jsonl, photos = captioned_library(jsonl, photos)
    check_photos_there(jsonl, photos)
    with output_lock(jsonl, wait, "captioner write-metadata"):
        return write_lines(jsonl, photos, overwrite, keep_mtime, progress, sidecar)


def write_lines(jsonl: Path, photos: Path, overwrite: bool, keep_mtime: bool, progress: bool,
                sidecar: bool) -> MetadataSummary:
    """write_library's loop over the lines, under the JSONL's lock."""
    summary = MetadataSummary()
    moved: dict[str, tuple[dict, dict]] = {}  # photos written in place: their size and mtime before and after

    def report(message: str) -> None:
        tqdm.write(f"skipped {message}", file=sys.stderr)  # above the progress bar, not through it

    with tqdm(total=count_lines(jsonl), unit="photo", desc="metadata", disable=not progress,
              mininterval=0.5 if sys.stderr.isatty() else 30, dynamic_ncols=True) as bar:
        for _, _, record in last_lines(jsonl):
            bar.update(1)
            key, captions = record["file"], record.get("captions")
            if not captions:  # a file captioning could not read: nothing to write
                summary.unread += 1
                continue
            keywords = [c["word"] for c in record.get("concepts", [])]
            try:
                path = library_path(photos, key)
                if sidecar:
                    outcome = write_sidecar(path, captions[0]["generated_text"], keywords, overwrite)
                    setattr(summary, outcome, getattr(summary, outcome) + 1)
                    continue
                if path.suffix.lower() in RAW_SUFFIXES:  # Exiv2 could write some; a camera original is not touched
                    report(f"{key}: {path.suffix.lstrip('.').upper()} files are camera originals and are left as "
                           "the camera wrote them (--sidecar writes an XMP sidecar beside them)")
                    summary.unsupported += 1
                    continue
                if path.suffix.lower() not in WRITABLE:
                    report(f"{key}: {path.suffix.lstrip('.').upper() or 'this'} files cannot hold a description "
                           "(Exiv2 cannot write them); --sidecar writes an XMP sidecar beside them")
                    summary.unsupported += 1
                    continue
                before = file_state(path.stat())
                outcome = write_photo(path, captions[0]["generated_text"], keywords, overwrite, keep_mtime)
                after = file_state(path.stat())
                if after != before:
                    moved[key] = (before, after)
            except (OSError, RuntimeError, ValueError) as err:  # pyexiv2 raises RuntimeError for Exiv2's errors
                report(f"{key}: cannot write its metadata: {err}")
                summary.failed += 1
                continue
            setattr(summary, outcome, getattr(summary, outcome) + 1)
    refresh_states(jsonl, moved)
    return summary


def refresh_states(jsonl: Path, moved: dict[str, tuple[dict, dict]]) -> None:
    """Give the lines of the photos this run wrote into their new size and mtime, so bulk.py does not
    caption them again. Only a line that recorded the state the photo had just before the write changes: a
    photo edited since its line stays edited. The JSONL is rewritten atomically (the caller holds its lock)."""
    if not moved:
        return

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as out:
            for _, line, record in read_lines(jsonl):
                before, after = moved.get(record["file"], (None, None))
                if before is not None and after is not None and {k: record.get(k) for k in before} == before:
                    out.write(json_line({**record, **after}).encode("utf-8"))
                else:
                    out.write(line)

    replace_file(jsonl, write)
