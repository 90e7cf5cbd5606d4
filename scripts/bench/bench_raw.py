"""Benchmark (not a test): a camera RAW read from its embedded preview JPEG, as load_image reads it, against
LibRaw's decode of the sensor data, by speed and by what the model makes of each.

For each RAW file (a folder of them, or, with --make, DNGs generated from examples/photos/*.jpg), three reads,
each --repeats times (the median kept; the file is in the page cache after the first):
- preview: `load_image(path)`, the embedded JPEG turned upright (what bulk captioning does today);
- half: LibRaw `postprocess(use_camera_wb=True, half_size=True)`, load_image's fallback for a file whose preview
  is missing or small (each 2x2 Bayer block becomes one pixel: no demosaicing);
- full: LibRaw `postprocess(use_camera_wb=True)`, a full-size demosaic (AHD).
Then how far apart the images are: mean absolute difference of their pixels (0-255) once each is resized to
224x224, and, with --captions, the shipped model's caption of each and the cosine of their image vectors.
A file whose preview load_image would not use (none, or one under data.MIN_RAW_PREVIEW px) is listed and
left out of the comparison.

A generated DNG holds a Bayer (RGGB) mosaic of the photo in linear light, upscaled to --megapixels, with
sRGB as its camera colour space, and a --preview-side JPEG of the same photo: the same scene in both, but the
preview is the photo itself, not a camera's own rendering, and upscaling leaves the sensor data smooth.
Timings of real camera files, compressed and with real noise, differ; run it on a folder of them.

    OMP_NUM_THREADS=1 python scripts/bench/bench_raw.py --make --captions
    OMP_NUM_THREADS=1 python scripts/bench/bench_raw.py ~/Pictures/raw --captions
"""
from __future__ import annotations

import argparse
import io
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SIDE = 224  # what the comparison resizes every image to: about what the encoders see
# XYZ (D65) -> linear sRGB: a DNG's ColorMatrix1 maps XYZ to camera colour, so with this matrix the camera
# colours are linear sRGB and LibRaw's conversion to sRGB leaves them as they are
XYZ_TO_SRGB = ((3.2406, -1.5372, -0.4986), (-0.9689, 1.8758, 0.0415), (0.0557, -0.2040, 1.0570))


def ifd(entries: dict[int, tuple[int, object]], at: int) -> bytes:
    """One little-endian TIFF IFD placed at byte `at`, the values longer than 4 bytes right after it."""
    extra_at = at + 2 + 12 * len(entries) + 4
    body, extra = b"", b""
    for tag in sorted(entries):
        kind, values = entries[tag]
        if kind in (1, 2):  # BYTE, ASCII
            packed = bytes(values)  # type: ignore[arg-type]
        elif kind in (5, 10):  # RATIONAL, SRATIONAL
            packed = b"".join(struct.pack("<II" if kind == 5 else "<ii", n, d) for n, d in values)  # type: ignore[union-attr]
        else:  # SHORT, LONG
            packed = b"".join(struct.pack("<H" if kind == 3 else "<I", v) for v in values)  # type: ignore[union-attr]
        count = len(packed) // {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 10: 8}[kind]
        if len(packed) <= 4:
            field = packed.ljust(4, b"\0")
        else:
            field = struct.pack("<I", extra_at + len(extra))
            extra += packed + b"\0" * (len(packed) % 2)
        body += struct.pack("<HHI", tag, kind, count) + field
    return struct.pack("<H", len(entries)) + body + struct.pack("<I", 0) + extra


def write_dng(path: Path, photo: Image.Image, megapixels: float, preview_side: int) -> None:
    """A DNG as a camera would write it, but uncompressed: IFD0 the preview JPEG (NewSubfileType 1), its SubIFD
    a 16-bit RGGB mosaic of the photo in linear light at about `megapixels`, even sides."""
    photo = photo.convert("RGB")
    scale = (megapixels * 1e6 / (photo.width * photo.height)) ** 0.5
    w, h = (2 * round(side * scale / 2) for side in photo.size)
    small = preview_side / max(photo.size)
    buf = io.BytesIO()
    photo.resize((round(photo.width * small), round(photo.height * small)), Image.Resampling.LANCZOS).save(
        buf, "JPEG", quality=90)
    preview = Image.open(buf)
    levels = np.arange(256) / 255
    linear = np.where(levels <= 0.04045, levels / 12.92, ((levels + 0.055) / 1.055) ** 2.4)
    to_16 = np.round(linear * 65535).astype("<u2")  # sRGB 8-bit -> linear 16-bit
    rgb = np.asarray(photo.resize((w, h), Image.Resampling.BICUBIC))
    mosaic = np.empty((h, w), "<u2")
    mosaic[0::2, 0::2] = to_16[rgb[0::2, 0::2, 0]]
    mosaic[0::2, 1::2] = to_16[rgb[0::2, 1::2, 1]]
    mosaic[1::2, 0::2] = to_16[rgb[1::2, 0::2, 1]]
    mosaic[1::2, 1::2] = to_16[rgb[1::2, 1::2, 2]]
    strip0, strip1 = buf.getvalue(), mosaic.tobytes()
    ifd0_at = 8 + len(strip0) + len(strip1)
    matrix = [(round(v * 10000), 10000) for row in XYZ_TO_SRGB for v in row]
    ifd0: dict[int, tuple[int, object]] = {
        254: (4, [1]), 256: (4, [preview.width]), 257: (4, [preview.height]), 258: (3, [8, 8, 8]), 259: (3, [7]),
        262: (3, [6]), 271: (2, b"Captioner\0"), 272: (2, b"Bench\0"), 273: (4, [8]), 274: (3, [1]), 277: (3, [3]),
        278: (4, [preview.height]), 279: (4, [len(strip0)]), 284: (3, [1]), 330: (4, [0]),
        50706: (1, [1, 4, 0, 0]), 50707: (1, [1, 1, 0, 0]), 50708: (2, b"Captioner Bench\0"),
        50721: (10, matrix), 50728: (5, [(1, 1), (1, 1), (1, 1)]), 50778: (3, [21])}
    size0 = len(ifd(ifd0, ifd0_at))
    sub_at = ifd0_at + size0 + size0 % 2
    ifd0[330] = (4, [sub_at])  # SubIFDs: the raw image
    sub: dict[int, tuple[int, object]] = {
        254: (4, [0]), 256: (4, [w]), 257: (4, [h]), 258: (3, [16]), 259: (3, [1]), 262: (3, [32803]),
        273: (4, [8 + len(strip0)]), 277: (3, [1]), 278: (4, [h]), 279: (4, [len(strip1)]), 284: (3, [1]),
        33421: (3, [2, 2]), 33422: (1, [0, 1, 1, 2]), 50710: (1, [0, 1, 2]), 50711: (3, [1]), 50717: (4, [65535])}
    path.write_bytes(b"II*\0" + struct.pack("<I", ifd0_at) + strip0 + strip1 + ifd(ifd0, ifd0_at)
                     + b"\0" * (size0 % 2) + ifd(sub, sub_at))


def timed(read: Callable[[Path], Image.Image], path: Path, repeats: int) -> tuple[Image.Image, float]:
    """The image and the median seconds of `repeats` reads."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        image = read(path)
        times.append(time.perf_counter() - start)
    return image, statistics.median(times)


def libraw(half: bool) -> Callable[[Path], Image.Image]:
    """A read of the sensor data by LibRaw, upright (LibRaw applies the RAW's orientation itself)."""
    import rawpy

    def read(path: Path) -> Image.Image:
        with rawpy.imread(str(path)) as raw:
            return Image.fromarray(raw.postprocess(use_camera_wb=True, half_size=half))
    return read


def preview_side(path: Path) -> int:
    """The shorter side of the preview load_image would read, 0 where there is none it would use."""
    import rawpy

    with rawpy.imread(str(path)) as raw:
        try:
            thumb = raw.extract_thumb()
        except (rawpy.LibRawNoThumbnailError, rawpy.LibRawUnsupportedThumbnailError):
            return 0
        if thumb.format == rawpy.ThumbFormat.JPEG:
            return min(Image.open(io.BytesIO(bytes(thumb.data))).size)
        return min(np.asarray(thumb.data).shape[:2])


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference (0-255) once both are SIDExSIDE."""
    small = [np.asarray(im.resize((SIDE, SIDE), Image.Resampling.BILINEAR), dtype=np.float32) for im in (a, b)]
    return float(np.abs(small[0] - small[1]).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="a folder of RAW files (searched with its subfolders)")
    parser.add_argument("--make", action="store_true", help="generate one DNG per example photo into --work instead")
    parser.add_argument("--work", type=Path, help="where --make writes its DNGs (default: a temporary folder)")
    parser.add_argument("--megapixels", type=float, default=24.0, help="--make: sensor size (default: 24)")
    parser.add_argument("--preview-side", type=int, default=1620,
                        help="--make: the preview's long side in px (default: 1620, a Sony or Nikon medium preview)")
    parser.add_argument("--repeats", type=int, default=3, help="reads of each file by each path (default: 3)")
    parser.add_argument("--captions", action="store_true", help="also caption each read with the shipped model")
    args = parser.parse_args()
    if (args.folder is None) == (not args.make):
        parser.error("give a folder of RAW files or --make")

    from captioner.data import MIN_RAW_PREVIEW, RAW_SUFFIXES, load_image

    if args.make:
        folder = args.work or Path(tempfile.mkdtemp(prefix="bench-raw-"))
        folder.mkdir(parents=True, exist_ok=True)
        for photo in sorted((ROOT / "examples" / "photos").glob("*.jpg")):
            write_dng(folder / f"{photo.stem}.dng", Image.open(photo), args.megapixels, args.preview_side)
    else:
        folder = args.folder
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in RAW_SUFFIXES and p.is_file())
    if not files:
        sys.exit(f"{folder}: no RAW files ({' '.join(sorted(RAW_SUFFIXES))})")
    print(f"{len(files)} RAW files in {folder}, {args.repeats} reads each, median times")

    reads = {"preview": load_image, "half": libraw(half=True), "full": libraw(half=False)}
    rows, images = [], []
    for path in files:
        side = preview_side(path)
        if side < MIN_RAW_PREVIEW:
            print(f"{path.name}: preview {side} px, under {MIN_RAW_PREVIEW}: load_image decodes it in full; left out")
            continue
        got = {name: timed(read, path, args.repeats) for name, read in reads.items()}
        images.append((path.name, {name: image for name, (image, _) in got.items()}))
        rows.append((path.name, {name: seconds for name, (_, seconds) in got.items()},
                     {pair: difference(got[pair[0]][0], got[pair[1]][0])
                      for pair in (("preview", "half"), ("preview", "full"), ("half", "full"))}))
        sizes = "  ".join(f"{name} {image.width}x{image.height}" for name, (image, _) in got.items())
        print(f"{path.name} ({path.stat().st_size / 2**20:.0f} MiB): {sizes}", flush=True)
    if not rows:
        return

    print(f"\n{'file':<16}{'preview ms':>11}{'half ms':>9}{'full ms':>9}   mean |diff| at {SIDE}px: "
          "preview-half preview-full half-full")
    for name, seconds, diffs in rows:
        print(f"{name:<16}{seconds['preview'] * 1e3:>11.0f}{seconds['half'] * 1e3:>9.0f}{seconds['full'] * 1e3:>9.0f}"
              f"   {'':>22}{diffs['preview', 'half']:>12.1f}{diffs['preview', 'full']:>13.1f}"
              f"{diffs['half', 'full']:>10.1f}")
    median = {name: statistics.median(s[name] for _, s, _ in rows) for name in reads}
    print(f"median: preview {median['preview'] * 1e3:.0f} ms, half {median['half'] * 1e3:.0f} ms "
          f"({median['half'] / median['preview']:.1f}x), full {median['full'] * 1e3:.0f} ms "
          f"({median['full'] / median['preview']:.1f}x)")

    if args.captions:
        from captioner.pipeline import Captioner

        captioner = Captioner.from_pretrained(device="cpu")
        opts = captioner.options()
        same = {"half": 0, "full": 0}
        print(f"\ncaptions of {captioner.name} (version {captioner.version}), beam {opts.beam_size}; the cosine of "
              "each read's image vector with the preview's")
        for name, by_read in images:
            results = dict(zip(by_read, captioner.generate(list(by_read.values()), opts, vectors=True)))
            texts = {read: captioner.as_dicts(r.captions)[0]["generated_text"] for read, r in results.items()}
            print(f"{name}:")
            for read, result in results.items():
                preview = results["preview"].vector
                cosine = "  -  " if preview is None else f"{float(result.vector @ preview):5.3f}"
                print(f"  {read:<8} {cosine}  {texts[read]}")
                if read != "preview":
                    same[read] += texts[read] == texts["preview"]
        n = len(images)
        print(f"same caption as the preview: half {same['half']} of {n}, full {same['full']} of {n}")


if __name__ == "__main__":
    main()
