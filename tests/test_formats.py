"""Phone and camera formats: HEIC/HEIF (pillow-heif), AVIF (Pillow), camera RAW (rawpy's embedded preview),
read upright, found by the folder walks, and a one-line error naming the file and the install command when
the extra a format needs is missing. Every fixture is generated here: HEIC by pillow-heif, AVIF by Pillow,
a minimal DNG (a linear-raw DNG with a JPEG or RGB preview) by a small TIFF writer."""
from __future__ import annotations

import io
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from captioner import bulk, data
from captioner.data import (
    HEIF_SUFFIXES,
    IMAGE_SUFFIXES,
    PILLOW_SUFFIXES,
    RAW_SUFFIXES,
    ImageError,
    expand_inputs,
    format_of,
    load_image,
)

from helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts" / "bench"))
from bench_raw import ifd  # noqa: E402  (the DNG writer: the benchmark makes larger ones of the same form)

ORIENTATION = 0x0112


def two_colours(size: tuple[int, int] = (400, 300)) -> Image.Image:
    """Red with a blue band down the left quarter: where the band ends up shows how the image was turned."""
    image = Image.new("RGB", size, (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, size[0] // 4, size[1]))
    return image


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif.tobytes()


def is_blue(pixel: tuple[int, ...]) -> bool:
    return pixel[2] > 200 and pixel[0] < 60


def assert_turned_clockwise(image: Image.Image, size: tuple[int, int] = (400, 300)) -> None:
    """EXIF orientation 6 (or LibRaw flip 6): the left band is on top once upright."""
    assert image.size == (size[1], size[0])
    w, h = image.size
    assert is_blue(image.getpixel((w // 2, 5))) and not is_blue(image.getpixel((w // 2, h - 5)))


def assert_turned_counterclockwise(image: Image.Image, size: tuple[int, int] = (400, 300)) -> None:
    """EXIF orientation 8 (LibRaw flip 5): the left band is at the bottom once upright."""
    assert image.size == (size[1], size[0])
    w, h = image.size
    assert is_blue(image.getpixel((w // 2, h - 5))) and not is_blue(image.getpixel((w // 2, 5)))


@pytest.fixture
def no_heif(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if pillow-heif were not installed: its import fails and the opener is not registered yet."""
    monkeypatch.setitem(sys.modules, "pillow_heif", None)
    monkeypatch.setattr(data, "_heif_registered", False)


# --- one list of readable suffixes ---------------------------------------------------------------------------

def test_every_listed_suffix_has_a_reader() -> None:
    """What the walks find is what load_image routes: RAW to rawpy, HEIF to pillow-heif, the rest to a Pillow
    plugin that claims the suffix."""
    pillow_knows = Image.registered_extensions()
    for suffix in IMAGE_SUFFIXES:
        kind = format_of(Path("x" + suffix), "x" + suffix)  # no such file: routed by its suffix alone
        if suffix in RAW_SUFFIXES:
            assert kind == "raw", suffix
        elif suffix in HEIF_SUFFIXES:
            assert kind == "heif", suffix
        else:
            assert suffix in PILLOW_SUFFIXES, suffix
            # a Pillow built without libavif has no AVIF plugin: load_image then says to upgrade
            assert suffix in pillow_knows or (suffix == ".avif" and not features.check("avif")), suffix
    assert {".heic", ".heif", ".avif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"} <= IMAGE_SUFFIXES


def test_walks_find_phone_and_camera_formats(tmp_path: Path) -> None:
    names = ["a.HEIC", "b.heif", "c.avif", "d.DNG", "e.cr2", "f.cr3", "g.nef", "h.arw", "i.raf", "j.orf", "k.rw2",
             "l.jpg", "m.txt", "n.xmp", "o.psd"]
    for name in names:
        (tmp_path / "lib" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "lib" / name).write_bytes(b"x")
    readable = sorted(names[:12])
    assert list(bulk.walk_library(tmp_path / "lib")) == readable
    assert [p.name for p in expand_inputs([str(tmp_path / "lib")])] == readable


# --- HEIC/HEIF ------------------------------------------------------------------------------------------------

def test_heic_is_read_upright_by_path_by_bytes_and_when_misnamed(tmp_path: Path) -> None:
    pillow_heif = pytest.importorskip("pillow_heif", reason="the heif extra: pip install -e '.[heif]'")
    pillow_heif.register_heif_opener()  # only to write the fixture; load_image registers it on its own
    two_colours().save(tmp_path / "kitten.heic", exif=exif_orientation(6), quality=90)
    assert_turned_clockwise(load_image(tmp_path / "kitten.heic"))
    assert_turned_clockwise(load_image((tmp_path / "kitten.heic").read_bytes(), name="upload"))
    (tmp_path / "kitten.jpg").write_bytes((tmp_path / "kitten.heic").read_bytes())  # a misnamed export
    assert_turned_clockwise(load_image(tmp_path / "kitten.jpg"))
    assert format_of(tmp_path / "kitten.jpg", "kitten.jpg") == "heif"


def test_heic_without_pillow_heif_names_the_file_and_the_install(tmp_path: Path, no_heif: None) -> None:
    photo = tmp_path / "IMG_0001.HEIC"
    photo.write_bytes(b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64)
    for source, name in ((photo, str(photo)), (photo.read_bytes(), "upload.bin")):  # bytes: sniffed
        with pytest.raises(ImageError) as err:
            load_image(source, name=name)
        message = str(err.value)
        assert "\n" not in message and message.startswith(name)
        assert "pillow-heif" in message and ".venv/bin/pip install -e '.[heif]'" in message
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.heic")


# --- AVIF -----------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not features.check("avif"), reason="this Pillow was built without AVIF (wheels have it from 11.3)")
def test_avif_is_read_upright(tmp_path: Path) -> None:
    two_colours().save(tmp_path / "espresso.avif", exif=exif_orientation(6), quality=90)
    assert_turned_clockwise(load_image(tmp_path / "espresso.avif"))
    assert format_of(tmp_path / "espresso.avif", "espresso.avif") == "avif"


# --- camera RAW -----------------------------------------------------------------------------------------------

def write_dng(path: Path, preview: Image.Image, orientation: int = 1, jpeg: bool = True,
              preview_orientation: int | None = None, raw_scale: int = 2) -> None:
    """A minimal DNG as LibRaw reads it: IFD0 holds the preview (NewSubfileType 1; a baseline JPEG, or 8-bit RGB)
    and the RAW's Orientation, its SubIFD a grey 16-bit linear-raw image `raw_scale` times the preview's size."""
    w, h = preview.size
    rw, rh = w * raw_scale, h * raw_scale
    if jpeg:
        buf = io.BytesIO()
        extra = {"exif": exif_orientation(preview_orientation)} if preview_orientation else {}
        preview.save(buf, "JPEG", quality=95, **extra)
        strip0, compression, photometric = buf.getvalue(), 7, 6
    else:
        strip0, compression, photometric = np.asarray(preview.convert("RGB")).tobytes(), 1, 2
    strip1 = np.full((rh, rw, 3), 20000, "<u2").tobytes()
    ifd0_at = 8 + len(strip0) + len(strip1)
    common = {277: (3, [3]), 284: (3, [1])}
    identity = [(1, 1), (0, 1), (0, 1), (0, 1), (1, 1), (0, 1), (0, 1), (0, 1), (1, 1)]
    ifd0: dict[int, tuple[int, object]] = {
        **common, 256: (4, [w]), 257: (4, [h]), 278: (4, [h]), 254: (4, [1]), 258: (3, [8, 8, 8]),
                                           259: (3, [compression]), 262: (3, [photometric]),
        273: (4, [8]), 279: (4, [len(strip0)]), 274: (3, [orientation]), 271: (2, b"Captioner\0"),
        272: (2, b"Test\0"), 50706: (1, [1, 4, 0, 0]), 50707: (1, [1, 1, 0, 0]), 50708: (2, b"Captioner Test\0"),
        50721: (10, identity), 50778: (3, [21]), 330: (4, [0])}
    size0 = len(ifd(ifd0, ifd0_at))
    sub_at = ifd0_at + size0 + size0 % 2
    ifd0[330] = (4, [sub_at])  # SubIFDs: the raw image
    sub = {**common, 256: (4, [rw]), 257: (4, [rh]), 278: (4, [rh]), 254: (4, [0]), 258: (3, [16, 16, 16]),
           259: (3, [1]), 262: (3, [34892]),
           273: (4, [8 + len(strip0)]), 279: (4, [len(strip1)])}
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd0_at) + strip0 + strip1 + ifd(ifd0, ifd0_at)
                     + b"\0" * (size0 % 2) + ifd(sub, sub_at))


def test_raw_without_rawpy_names_the_file_and_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rawpy", None)
    for suffix in sorted(RAW_SUFFIXES):
        photo = tmp_path / f"IMG_0001{suffix.upper()}"
        photo.write_bytes(b"II*\0" + b"\0" * 64)  # TIFF-like, as most RAWs: Pillow must not be asked
        with pytest.raises(ImageError) as err:
            load_image(photo)
        message = str(err.value)
        assert "\n" not in message and message.startswith(str(photo))
        assert "rawpy" in message and ".venv/bin/pip install -e '.[raw]'" in message
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.nef")


def test_raw_suffixes_go_to_libraw_not_pillow(tmp_path: Path) -> None:
    pytest.importorskip("rawpy", reason="the raw extra: pip install -e '.[raw]'")
    for suffix in sorted(RAW_SUFFIXES):
        photo = tmp_path / f"junk{suffix}"
        photo.write_bytes(b"II*\0" + b"\0" * 64)
        with pytest.raises(ImageError, match=r"cannot read RAW file: [^b]"):  # LibRaw's reason, as text
            load_image(photo)
    (tmp_path / "empty.nef").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        load_image(tmp_path / "empty.nef")
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "missing.cr2")


@pytest.mark.parametrize("jpeg", [True, False], ids=["jpeg-preview", "rgb-preview"])
def test_dng_preview_is_read_upright(tmp_path: Path, jpeg: bool) -> None:
    pytest.importorskip("rawpy", reason="the raw extra: pip install -e '.[raw]'")
    write_dng(tmp_path / "cw.dng", two_colours(), orientation=6, jpeg=jpeg)
    image = load_image(tmp_path / "cw.dng")
    assert_turned_clockwise(image)
    assert image.getpixel((150, 300))[0] > 200  # the preview's own red, not the grey of the raw data
    write_dng(tmp_path / "ccw.dng", two_colours(), orientation=8, jpeg=jpeg)
    assert_turned_counterclockwise(load_image(tmp_path / "ccw.dng"))
    write_dng(tmp_path / "up.dng", two_colours(), orientation=1, jpeg=jpeg)
    assert load_image((tmp_path / "up.dng").read_bytes(), name="up.dng").size == (400, 300)


def test_dng_preview_with_its_own_orientation_is_turned_once(tmp_path: Path) -> None:
    """A preview JPEG whose EXIF says how to turn it is turned by that, not also by the RAW's orientation."""
    pytest.importorskip("rawpy", reason="the raw extra: pip install -e '.[raw]'")
    write_dng(tmp_path / "both.dng", two_colours(), orientation=6, preview_orientation=6)
    assert_turned_clockwise(load_image(tmp_path / "both.dng"))


def test_dng_with_a_small_preview_is_decoded_in_full(tmp_path: Path) -> None:
    pytest.importorskip("rawpy", reason="the raw extra: pip install -e '.[raw]'")
    small = two_colours((160, 120))
    assert max(small.size) < data.MIN_RAW_PREVIEW
    write_dng(tmp_path / "small.dng", small, orientation=6)
    image = load_image(tmp_path / "small.dng")
    pixels = np.asarray(image).astype(int)
    assert image.size == (240, 320)  # the 320x240 raw data (half_size halves Bayer data only), turned by LibRaw
    assert np.ptp(pixels[..., :3].mean(axis=2)) < 10 and not is_blue(image.getpixel((30, 5)))  # the grey raw data
