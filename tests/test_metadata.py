"""Captions written into photos' metadata (metadata.py): read back by pyexiv2 and by Pillow, pixels and
compressed image data untouched, a photo's own description kept, modification times kept on request,
formats Exiv2 cannot write reported and skipped, and a run SIGKILLed mid-write resumed with every photo
whole and written once. Captions come from hand-made JSONL lines, except in the one end-to-end test."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, IptcImagePlugin

from captioner import cli, metadata
from captioner.extras import install_hint
from captioner.metadata import write_library

from helpers import ROOT, killer_command

pyexiv2 = pytest.importorskip("pyexiv2")

CAPTION = "a dog runs on the beach"


def line(file: str, caption: str = CAPTION, concepts: tuple[str, ...] = ("dog", "seashore")) -> str:
    return json.dumps({"file": file, "captions": [{"generated_text": caption, "score": -1.0}],
                       "concepts": [{"word": w, "probability": 0.9} for w in concepts]}) + "\n"


def make_photos(folder: Path, names: list[str]) -> None:
    rng = np.random.default_rng(0)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 28, 3), dtype=np.uint8)).save(folder / name)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def image_data(path: Path) -> bytes:
    """The compressed image data: a JPEG's bytes from its start-of-scan marker on, a PNG's IDAT chunks."""
    data = path.read_bytes()
    if data[:2] == b"\xff\xd8":
        at = 2
        while data[at + 1] != 0xDA:  # walk the marker segments (their lengths) up to start-of-scan
            at += 2 + int.from_bytes(data[at + 2:at + 4], "big")
        return data[at:]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat = 8, b""
    while at < len(data):
        size, kind = int.from_bytes(data[at:at + 4], "big"), data[at + 4:at + 8]
        idat += data[at + 8:at + 8 + size] if kind == b"IDAT" else b""
        at += 12 + size
    return idat


def description(path: Path) -> str:
    return metadata.read_current(path).description


@pytest.mark.parametrize("name", ["2019/beach.jpg", "beach.png"])
def test_round_trip_read_by_pyexiv2_and_pillow_with_the_image_data_untouched(tmp_path, name):
    make_photos(tmp_path / "photos", [name])
    photo = tmp_path / "photos" / name
    before_pixels, before_data = pixels(photo), image_data(photo)
    (tmp_path / "c.jsonl").write_text(line(name))
    summary = write_library(tmp_path / "c.jsonl", tmp_path / "photos", progress=False)
    assert summary.written == 1 and summary.failed == 0

    with pyexiv2.Image(str(photo)) as im:
        xmp, exif, iptc = im.read_xmp(), im.read_exif(), im.read_iptc()
    assert xmp["Xmp.dc.description"] == {'lang="x-default"': CAPTION} and xmp["Xmp.dc.subject"] == ["dog", "seashore"]
    assert exif["Exif.Image.ImageDescription"] == CAPTION
    assert iptc["Iptc.Application2.Caption"] == CAPTION and iptc["Iptc.Application2.Keywords"] == ["dog", "seashore"]

    with Image.open(photo) as im:  # a second reader
        assert im.getexif()[0x010E] == CAPTION
        packet = im.info["xmp"].decode() if isinstance(im.info["xmp"], bytes) else im.info["xmp"]
        if name.endswith(".jpg"):  # Pillow reads IPTC from JPEG and TIFF only
            iptc_pil = IptcImagePlugin.getiptcinfo(im)
            assert iptc_pil[(2, 120)] == CAPTION.encode() and iptc_pil[(2, 25)] == [b"dog", b"seashore"]
    assert f'<rdf:li xml:lang="x-default">{CAPTION}</rdf:li>' in packet
    assert "<rdf:Bag>" in packet and "<rdf:li>seashore</rdf:li>" in packet  # dc:subject as the standard's Bag

    assert np.array_equal(pixels(photo), before_pixels)
    assert image_data(photo) == before_data
    assert sorted(p.name for p in photo.parent.iterdir()) == [Path(name).name]  # no temporary file left


@pytest.mark.skipif(shutil.which("exiftool") is None,
                    reason="ExifTool is not installed (Debian: libimage-exiftool-perl; .ci/run installs it)")
@pytest.mark.parametrize("name", ["beach.jpg", "beach.png", "beach.webp"])
def test_exiftool_reads_what_was_written(tmp_path, name):
    """ExifTool, the reference reader photo managers agree with, finds every field (WebP has no IPTC)."""
    make_photos(tmp_path / "photos", [name])
    (tmp_path / "c.jsonl").write_text(line(name))
    assert write_library(tmp_path / "c.jsonl", tmp_path / "photos", progress=False).written == 1
    read = subprocess.run(["exiftool", "-json", "-G1", "-XMP-dc:Description", "-XMP-dc:Subject",
                           "-IFD0:ImageDescription", "-IPTC:Caption-Abstract", "-IPTC:Keywords",
                           str(tmp_path / "photos" / name)], capture_output=True, text=True, check=True)
    fields = json.loads(read.stdout)[0]
    assert fields["XMP-dc:Description"] == CAPTION and fields["XMP-dc:Subject"] == ["dog", "seashore"]
    assert fields["IFD0:ImageDescription"] == CAPTION
    if name.endswith(".webp"):
        assert not any(key.startswith("IPTC:") for key in fields)
    else:
        assert fields["IPTC:Caption-Abstract"] == CAPTION and fields["IPTC:Keywords"] == ["dog", "seashore"]


def test_a_photo_with_its_own_description_is_kept_unless_overwrite(tmp_path):
    make_photos(tmp_path / "photos", ["own.jpg"])
    photo = tmp_path / "photos" / "own.jpg"
    with pyexiv2.Image(str(photo)) as im:
        im.modify_xmp({"Xmp.dc.description": {'lang="x-default"': "grandma's birthday"}, "Xmp.dc.subject": ["family"]})
    (tmp_path / "c.jsonl").write_text(line("own.jpg"))
    before = pixels(photo), image_data(photo)
    assert write_library(tmp_path / "c.jsonl", tmp_path / "photos", progress=False).kept == 1
    assert description(photo) == "grandma's birthday"  # kept, but the concepts join its keywords
    assert metadata.read_current(photo).keywords == ["family", "dog", "seashore"]
    assert np.array_equal(pixels(photo), before[0]) and image_data(photo) == before[1]
    written = photo.read_bytes()
    assert write_library(tmp_path / "c.jsonl", tmp_path / "photos", progress=False).kept == 1
    assert photo.read_bytes() == written  # a rerun finds the keywords there: not rewritten

    assert write_library(tmp_path / "c.jsonl", tmp_path / "photos", overwrite=True, progress=False).written == 1
    assert description(photo) == CAPTION
    assert metadata.read_current(photo).keywords == ["family", "dog", "seashore"]  # its own keywords stay, first


@pytest.mark.parametrize("keep", [True, False])
def test_modification_time_is_kept_on_request(tmp_path, keep):
    make_photos(tmp_path / "photos", ["old.jpg"])
    photo = tmp_path / "photos" / "old.jpg"
    old = 1_000_000_000_123_456_789  # September 2001, to the nanosecond
    os.utime(photo, ns=(old, old))
    (tmp_path / "c.jsonl").write_text(line("old.jpg"))
    write_library(tmp_path / "c.jsonl", tmp_path / "photos", keep_mtime=keep, progress=False)
    assert description(photo) == CAPTION
    assert (photo.stat().st_mtime_ns == old) == keep


def test_unwritable_formats_and_bad_lines_are_reported_by_name_and_skipped(tmp_path, capsys):
    make_photos(tmp_path / "photos", ["a.gif", "b.bmp", "c.jpg"])
    make_photos(tmp_path, ["outside.jpg"])
    (tmp_path / "c.jsonl").write_text(line("a.gif") + line("b.bmp") + line("c.jpg") + line("../outside.jpg")
                                      + line("gone.jpg") + json.dumps({"file": "d.jpg", "error": "unreadable"}) + "\n")
    untouched = {p: p.read_bytes() for p in [tmp_path / "photos/a.gif", tmp_path / "photos/b.bmp",
                                             tmp_path / "outside.jpg"]}
    assert cli.main(["write-metadata", str(tmp_path / "c.jsonl"), "--photos", str(tmp_path / "photos")]) == 1
    err = capsys.readouterr().err
    assert "skipped a.gif: GIF files cannot hold a description" in err
    assert "skipped b.bmp: BMP files cannot hold a description" in err
    assert "skipped ../outside.jpg: cannot write its metadata: '../outside.jpg' is not a path inside" in err
    assert "skipped gone.jpg: cannot write its metadata" in err
    assert "metadata of 1 photos written" in err and "2 in formats that cannot hold one, 2 failed" in err
    assert all(p.read_bytes() == data for p, data in untouched.items())
    assert description(tmp_path / "photos" / "c.jpg") == CAPTION


def test_phone_and_camera_formats_are_reported_not_written(tmp_path, capsys):
    """HEIC and AVIF (Exiv2 reads them but cannot write them) and camera RAW (never touched) are counted as
    formats that cannot hold a description, each named with its reason, not as failures."""
    (tmp_path / "photos").mkdir()
    raw = b"II*\0" + b"\0" * 64
    for name in ["a.heic", "b.avif", "c.CR2", "d.nef"]:
        (tmp_path / "photos" / name).write_bytes(raw)
    (tmp_path / "c.jsonl").write_text("".join(line(n) for n in ["a.heic", "b.avif", "c.CR2", "d.nef"]))
    assert cli.main(["write-metadata", str(tmp_path / "c.jsonl"), "--photos", str(tmp_path / "photos")]) == 0
    err = capsys.readouterr().err
    assert "skipped a.heic: HEIC files cannot hold a description (Exiv2 cannot write them)" in err
    assert "skipped b.avif: AVIF files cannot hold a description" in err
    assert "skipped c.CR2: CR2 files are camera originals and are left as the camera wrote them" in err
    assert "skipped d.nef: NEF files are camera originals" in err
    assert "4 in formats that cannot hold one, 0 failed" in err
    assert all((tmp_path / "photos" / n).read_bytes() == raw for n in ["a.heic", "b.avif", "c.CR2", "d.nef"])


def test_a_missing_pyexiv2_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyexiv2", None)
    with pytest.raises(ImportError, match=re.escape(install_hint("metadata"))):
        metadata.exiv2()


def test_caption_with_write_metadata_writes_what_the_jsonl_holds(tmp_path):
    """End to end with the shipped model: the bulk JSONL's best caption and concepts end up in each photo."""
    make_photos(tmp_path / "photos", ["x.jpg", "sub/y.png"])
    out = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(tmp_path / "photos"), "--output", str(out), "--device", "cpu",
                     "--write-metadata"]) == 0
    for record in map(json.loads, out.read_text().splitlines()):
        current = metadata.read_current(tmp_path / "photos" / record["file"])
        assert current.description == record["captions"][0]["generated_text"]
        assert current.keywords == [c["word"] for c in record["concepts"]]
    with pytest.raises(SystemExit, match="goes with a .jsonl --output"):
        cli.main(["caption", str(tmp_path / "photos" / "x.jpg"), "--write-metadata"])


@pytest.mark.slow
@pytest.mark.cli
def test_killed_mid_run_every_photo_is_whole_and_a_rerun_writes_each_once(tmp_path):
    """A `write-metadata` child SIGKILLed just before the 12th rename over a photo, then a second one killed
    while editing its 5th copy (a half-edited NAME.tmp left behind), then a full run: every photo is either
    untouched or complete at each kill, and in the end each was written exactly once, pixels unchanged."""
    names = [f"{2019 + i % 3}/p{i:02d}.{'jpg' if i % 2 else 'png'}" for i in range(30)]
    photos = tmp_path / "photos"
    make_photos(photos, names)
    originals = {n: ((photos / n).read_bytes(), pixels(photos / n), image_data(photos / n)) for n in names}
    (tmp_path / "c.jsonl").write_text("".join(line(n, caption=f"photo number {i}") for i, n in enumerate(names)))
    argv = ["write-metadata", str(tmp_path / "c.jsonl"), "--photos", str(photos)]

    def run(kill: tuple[str, str, int, str] | None = None) -> subprocess.CompletedProcess:
        cmd = killer_command(kill, *argv) if kill else [sys.executable, "-m", "captioner.cli", *argv]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT, timeout=300)

    def check_whole() -> int:
        """Each photo is its original or has its caption, with its image data; how many have it."""
        done = 0
        for i, n in enumerate(names):
            data, pix, compressed = originals[n]
            assert np.array_equal(pixels(photos / n), pix) and image_data(photos / n) == compressed, n
            if (photos / n).read_bytes() != data:
                assert description(photos / n) == f"photo number {i}", n
                done += 1
        return done

    kills = [("os:replace", "str(args[1]).endswith(('.jpg', '.png'))", 12, "before"),
             ("pyexiv2:Image.modify_exif", "True", 5, "before")]
    for kill, done in zip(kills, [11, 15]):
        result = run(kill)
        assert result.returncode == -9, result.stderr[-2000:]
        assert check_whole() == done
    assert len(list(photos.rglob("*.tmp"))) == 1  # the half-edited copy: never a photo's name

    result = run()
    assert result.returncode == 0, result.stderr[-2000:]
    assert "metadata of 15 photos written, 15 already had their caption" in result.stderr
    assert check_whole() == len(names) and not list(photos.rglob("*.tmp"))


XMP_WITH_HISTORY = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
<rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmlns:darktable="http://darktable.sf.net/"
 xmlns:dc="http://purl.org/dc/elements/1.1/" xmp:Rating="4" darktable:history_end="3">
<dc:description><rdf:Alt><rdf:li xml:lang="x-default">{description}</rdf:li></rdf:Alt></dc:description>
<dc:subject><rdf:Bag><rdf:li>family</rdf:li></rdf:Bag></dc:subject>
</rdf:Description></rdf:RDF></x:xmpmeta>
<?xpacket end="w"?>
"""


def sidecar_fields(path: Path) -> dict:
    """A sidecar's description, keywords, rating and darktable history end, read by ExifTool where installed,
    else Exiv2's command line, else the XML itself: each an independent reader of what was written."""
    if shutil.which("exiftool"):
        got = json.loads(subprocess.run(["exiftool", "-json", "-G1", "-XMP:all", str(path)], capture_output=True,
                                        text=True, check=True).stdout)[0]
        subject = got.get("XMP-dc:Subject", [])
        return {"description": got.get("XMP-dc:Description"), "subject": [subject] if isinstance(subject, str)
                else subject, "rating": got.get("XMP-xmp:Rating"), "history_end": got.get("XMP-darktable:History_end")}
    if shutil.which("exiv2"):
        out = subprocess.run(["exiv2", "-PXkv", str(path)], capture_output=True, text=True, check=True).stdout
        values = dict(row.split(None, 1) for row in out.splitlines() if len(row.split(None, 1)) == 2)
        return {"description": values.get("Xmp.dc.description", "").removeprefix('lang="x-default" ') or None,
                "subject": values["Xmp.dc.subject"].split(", ") if "Xmp.dc.subject" in values else [],
                "rating": int(values["Xmp.xmp.Rating"]) if "Xmp.xmp.Rating" in values else None,
                "history_end": int(values["Xmp.darktable.history_end"]) if "Xmp.darktable.history_end" in values
                else None}
    import xml.etree.ElementTree as ET
    ns = {"rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#", "dc": "http://purl.org/dc/elements/1.1/"}
    root = ET.fromstring(path.read_text().split("?>", 1)[1].rsplit("<?xpacket", 1)[0])
    about = root.find(".//rdf:Description", ns)
    attr = {k.rsplit("}", 1)[-1]: v for k, v in about.attrib.items()}
    description = root.find(".//dc:description//rdf:li", ns)
    return {"description": description.text if description is not None else None,
            "subject": [li.text for li in root.findall(".//dc:subject//rdf:li", ns)],
            "rating": int(attr["Rating"]) if "Rating" in attr else None,
            "history_end": int(attr["history_end"]) if "history_end" in attr else None}


@pytest.mark.parametrize("name", ["2019/beach.jpg", "IMG_0001.CR2", "kitten.heic"])
def test_sidecar_is_written_beside_the_photo_which_is_not_touched(tmp_path, name):
    """`--sidecar`: NAME.ext.xmp holds the caption and concepts; the photo (RAW and HEIC included, which
    cannot be written otherwise) keeps every byte and its mtime; a rerun writes nothing."""
    photos = tmp_path / "photos"
    if name.endswith(".jpg"):
        make_photos(photos, [name])
    else:
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"II*\0" + bytes(range(256)) * 4)
    photo = photos / name
    before, mtime = photo.read_bytes(), photo.stat().st_mtime_ns
    (tmp_path / "c.jsonl").write_text(line(name))
    summary = write_library(tmp_path / "c.jsonl", photos, sidecar=True, progress=False)
    assert (summary.written, summary.failed, summary.unsupported) == (1, 0, 0)
    sidecar = photo.with_name(photo.name + ".xmp")
    assert sidecar_fields(sidecar) == {"description": CAPTION, "subject": ["dog", "seashore"], "rating": None,
                                       "history_end": None}
    assert photo.read_bytes() == before and photo.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in photo.parent.iterdir()) == sorted([photo.name, sidecar.name])  # no .tmp left

    written = sidecar.read_bytes()
    again = write_library(tmp_path / "c.jsonl", photos, sidecar=True, progress=False)
    assert (again.written, again.already_done) == (0, 1) and sidecar.read_bytes() == written


def test_an_existing_sidecar_is_merged_and_its_description_kept_unless_overwrite(tmp_path, capsys):
    """darktable's fields (rating, history) and the sidecar's own keywords survive; its own description stays
    without --overwrite-metadata (the concepts still join the keywords) and is replaced with it."""
    make_photos(tmp_path / "photos", ["beach.jpg"])
    sidecar = tmp_path / "photos" / "beach.jpg.xmp"
    sidecar.write_text(XMP_WITH_HISTORY.format(description="our first holiday"), encoding="utf-8")
    (tmp_path / "c.jsonl").write_text(line("beach.jpg"))
    argv = ["write-metadata", str(tmp_path / "c.jsonl"), "--photos", str(tmp_path / "photos"), "--sidecar"]
    assert cli.main(argv) == 0
    assert "1 kept a description of their own" in capsys.readouterr().err
    assert sidecar_fields(sidecar) == {"description": "our first holiday", "subject": ["family", "dog", "seashore"],
                                       "rating": 4, "history_end": 3}
    assert cli.main([*argv, "--overwrite-metadata"]) == 0
    assert "metadata of 1 XMP sidecars written" in capsys.readouterr().err
    assert sidecar_fields(sidecar) == {"description": CAPTION, "subject": ["family", "dog", "seashore"],
                                       "rating": 4, "history_end": 3}


def test_a_new_sidecar_starts_from_the_photos_own_description_and_keywords(tmp_path):
    """A photo manager reading the sidecar must not lose what the photo itself says: a photo with its own
    description keeps it in the new sidecar, with its keywords first."""
    make_photos(tmp_path / "photos", ["own.jpg"])
    photo = tmp_path / "photos" / "own.jpg"
    with pyexiv2.Image(str(photo)) as im:
        im.modify_xmp({"Xmp.dc.description": {'lang="x-default"': "grandma's birthday"}, "Xmp.dc.subject": ["family"]})
    (tmp_path / "c.jsonl").write_text(line("own.jpg"))
    assert write_library(tmp_path / "c.jsonl", tmp_path / "photos", sidecar=True, progress=False).kept == 1
    fields = sidecar_fields(photo.with_name("own.jpg.xmp"))
    assert fields["description"] is None and fields["subject"] == ["family", "dog", "seashore"]


def test_caption_write_metadata_sidecar_end_to_end(tmp_path):
    """`caption LIB --output x.jsonl --write-metadata --sidecar` with the shipped model: a sidecar per photo,
    the photos byte for byte as they were."""
    make_photos(tmp_path / "photos", ["x.jpg", "sub/y.png"])
    before = {p: p.read_bytes() for p in (tmp_path / "photos").rglob("*.*")}
    out = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(tmp_path / "photos"), "--output", str(out), "--device", "cpu",
                     "--write-metadata", "--sidecar"]) == 0
    for record in map(json.loads, out.read_text().splitlines()):
        fields = sidecar_fields(tmp_path / "photos" / (record["file"] + ".xmp"))
        assert fields["description"] == record["captions"][0]["generated_text"]
        assert fields["subject"] == [c["word"] for c in record["concepts"]]
    assert all(p.read_bytes() == data for p, data in before.items())
    with pytest.raises(SystemExit, match="go with --write-metadata"):
        cli.main(["caption", str(tmp_path / "photos"), "--output", str(out), "--sidecar"])


def test_a_wrong_photos_folder_is_one_line_and_exit_2(tmp_path, capsys):
    make_photos(tmp_path / "photos", [f"p{i}.jpg" for i in range(30)])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "c.jsonl").write_text("".join(line(f"p{i}.jpg") for i in range(30)))
    assert cli.main(["write-metadata", str(tmp_path / "c.jsonl"), "--photos", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "holds none of the first 20 photos c.jsonl lists (such as p0.jpg)" in err


def test_error_lines_are_counted_and_a_files_last_line_is_its_caption(tmp_path, capsys):
    """A photo captioned twice (edited since) is written once, with its last caption; the JSONL's error
    lines are counted in the summary."""
    make_photos(tmp_path / "photos", ["a.jpg", "b.jpg"])
    (tmp_path / "c.jsonl").write_text(line("a.jpg", caption="an old caption") + line("b.jpg")
                                      + json.dumps({"file": "bad.jpg", "error": "bad.jpg: cannot identify"}) + "\n"
                                      + line("a.jpg", caption="a new caption"))
    assert cli.main(["write-metadata", str(tmp_path / "c.jsonl"), "--photos", str(tmp_path / "photos")]) == 0
    err = capsys.readouterr().err
    assert "metadata of 2 photos written" in err and "1 lines the captioning could not read" in err
    assert description(tmp_path / "photos" / "a.jpg") == "a new caption"
