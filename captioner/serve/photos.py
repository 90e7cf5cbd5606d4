"""The photos a request brings or the library shows: read, checked against the server's limits, resized;
all of it in one bounded pool of threads, never on the event loop."""
from __future__ import annotations

import io
import os

import anyio
import torch
from fastapi import HTTPException
from PIL import Image

from ..bulk import library_path
from ..data import ImageError, ImageTooLarge, load_image
from ..pipeline import Captioner
from ..search import Library

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo passes; decompression bombs (gigapixels) do not
MAX_ASPECT = 20  # longer side / shorter side: panoramas pass; a 20000x1 strip would resize to gigabytes
THUMBNAIL_SIZE = 256  # longer side, in pixels, of a search hit's picture


def decode_slots() -> anyio.CapacityLimiter:
    """The pool that decodes, resizes and draws: it bounds how many decoded images are in memory at once."""
    return anyio.CapacityLimiter(max(2, os.cpu_count() or 2))


def read_photo(source: bytes | str, name: str, max_pixels: int) -> Image.Image:
    """An uploaded image, refused (ImageError) when over `max_pixels` from its header, unreadable, or so narrow
    that resizing its short side to the encoder's would take more memory than any real photo."""
    image = load_image(source, max_pixels=max_pixels, name=name)
    if max(image.size) > MAX_ASPECT * min(image.size):
        raise ImageError(f"{name}: {image.width}x{image.height} is too narrow to caption; the longer side may be "
                         f"at most {MAX_ASPECT} times the shorter")
    return image


def decode_upload(data: bytes, name: str, captioner: Captioner, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Bytes -> the encoder's input tensor; raises the HTTP error that says what is wrong."""
    if not data:
        raise HTTPException(400, f"{name}: empty image")
    if len(data) > max_bytes:
        raise HTTPException(413, f"{name}: {len(data)} bytes is more than the limit of {max_bytes}")
    try:
        image = read_photo(data, name, max_pixels)
    except ImageError as err:
        raise HTTPException(413 if isinstance(err, ImageTooLarge) else 400, str(err)) from None
    return captioner.encoder.preprocess(image)


def thumbnail(library: Library, file: str, max_pixels: int, size: int = THUMBNAIL_SIZE) -> Image.Image:
    """A small picture of one of the library's photos. Only photos its JSONL lists are shown, and only under
    its folder, so no request reaches any other file; anything else is a 404."""
    if file not in library.records:
        raise HTTPException(404, f"{file!r} is not a photo of the library")
    try:
        image = load_image(library_path(library.photos, file), max_pixels=max_pixels, name=file)
    except (ImageError, ValueError) as err:  # gone, unreadable, or a path out of the folder in the JSONL
        raise HTTPException(404, str(err)) from None
    image.thumbnail((size, size))
    return image


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()
