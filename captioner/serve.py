"""`captioner serve`: a REST API (FastAPI) and a browser UI (Gradio) in one process, sharing one model.

Requests from both faces go through one `Batcher`: a worker thread that owns the model and gathers the
requests that arrive within a few milliseconds of each other into one encoder and decoder pass. Everything
that can fail on user input (size, base64, decoding, pixel count, shape, options) is checked in the request's
own thread before it reaches the batch, so a bad request gets its 4xx and never costs anyone else theirs.
Decoding, resizing and drawing run in worker threads through one bounded pool, never on the event loop.
Anything unexpected answers a bare 500 with an id; the traceback goes to the server's log under that id.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import logging
import math
import os
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import anyio
import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from . import __version__
from .bulk import library_path
from .data import ImageError, ImageTooLarge, expand_inputs, load_image
from .decoding import Caption
from .decoding_options import LIMITS, OPTIONS, DecodingOptions, OptionError
from .pipeline import Captioned, Captioner, extras
from .search import Library

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo passes; decompression bombs (gigapixels) do not
MAX_BATCH_SIZE = 16
BATCH_WAIT_MS = 20.0  # long enough for a client's next request to make the batch (docs/BENCHMARKS.md)
MAX_QUEUE = 256
MAX_ASPECT = 20  # longer side / shorter side: panoramas pass; a 20000x1 strip would resize to gigabytes
THUMBNAIL_SIZE = 256  # longer side, in pixels, of a search hit's picture
NO_LIBRARY = ("this server has no library to search: start it with `captioner serve --library captions.jsonl "
              "--photos LIBRARY/`")
INFLIGHT_OFF_LOOPBACK = 8  # --max-inflight-per-client when serving other machines and not given
API_KEY_ENV = "CAPTIONER_API_KEY"

log = logging.getLogger(__name__)


class Busy(RuntimeError):
    """The batcher's queue is full: the server answers 503 rather than letting latency and memory grow."""


class Closed(RuntimeError):
    """The batcher has been closed (the server is shutting down): new work is refused, never left waiting."""


@dataclass
class Result:
    """One image's n-best captions and what its batch cost."""

    captions: list[Caption]
    concepts: list[tuple[str, float]]
    neighbours: list[tuple[str, float]]
    batch_size: int
    queue_ms: float
    model_ms: float


@dataclass
class _Job:
    pixels: torch.Tensor
    opts: DecodingOptions
    future: Future
    queued: float


class Batcher:
    """Dynamic batching: a request to an idle model runs at once, with whatever else is queued; requests
    that arrive while a batch runs wait for it, then at most `max_wait_ms` more for others, and all of
    them (up to `max_batch_size`, grouped by decoding options) run as one batch. Alone, a client never
    waits for a window; under load, requests share passes, so throughput grows with the number of clients.
    `max_batch_size=1` turns batching off. One thread runs the model, so its CPU threads never compete.

    Any thread may submit, start and close: one lock covers the worker, the queue limit and the closed flag,
    so two threads never start two workers, the limit is exact, and a job is either queued before the
    worker's stop signal (and run) or refused with `Closed`."""

    def __init__(self, captioner: Captioner, max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = BATCH_WAIT_MS,
                 max_queue: int = MAX_QUEUE) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.captioner, self.max_batch_size, self.max_wait = captioner, max_batch_size, max_wait_ms / 1000
        self.max_queue = max_queue
        self.batches = self.images = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def start(self) -> None:
        """Start the worker unless it runs (submit does this; calling it first saves the first request the wait)."""
        with self._lock:
            self._start()

    def _start(self) -> None:  # the caller holds the lock
        if self._closed:
            raise Closed("the server is shutting down; no new work is taken")
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="captioner-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Refuse new work, finish the queued work, then stop the worker. Safe to call more than once."""
        with self._lock:
            if not self._closed and self._thread is not None:
                self._queue.put(None)  # after every job already queued: those still run
            self._closed = True
            thread = self._thread
        if thread is not None:
            thread.join()

    def submit(self, pixels: torch.Tensor, opts: DecodingOptions) -> Future:
        """Queue one preprocessed image (3, S, S); the future gives its `Result`. Raises Busy when the queue
        is full and Closed after `close`."""
        future: Future = Future()
        with self._lock:
            self._start()
            if self._queue.qsize() >= self.max_queue:
                raise Busy(f"{self.max_queue} images are waiting for the model; try again shortly")
            self._queue.put(_Job(pixels, opts, future, time.perf_counter()))
        return future

    async def caption(self, pixels: torch.Tensor, opts: DecodingOptions) -> Result:
        return await asyncio.wrap_future(self.submit(pixels, opts))

    def _gather(self) -> list[_Job] | None:
        """The next batch. An idle worker starts at once with what is queued; after a busy spell, the
        requests that waited behind the last batch wait up to the window for others to join them."""
        idle = self._queue.empty()
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.perf_counter() + (0.0 if idle else self.max_wait)
        while len(jobs) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:  # stop after this batch
                self._queue.put(None)
                break
            jobs.append(job)
        return jobs

    def _work(self) -> None:
        while (jobs := self._gather()) is not None:
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # clients that hung up
            groups: dict[DecodingOptions, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.opts, []).append(job)
            for opts, group in groups.items():
                self._run(opts, group)

    def _run(self, opts: DecodingOptions, jobs: list[_Job]) -> None:
        start = time.perf_counter()
        try:
            captions = self.captioner.generate(torch.stack([j.pixels for j in jobs]), opts)
        except Exception as err:  # noqa: BLE001 - the callers get the error; the worker lives on
            for job in jobs:
                job.future.set_exception(err)
            return
        model_ms = (time.perf_counter() - start) * 1000
        self.batches += 1
        self.images += len(jobs)
        for job, result in zip(jobs, captions):
            job.future.set_result(Result(result.captions, result.concepts, result.neighbours, len(jobs),
                                         (start - job.queued) * 1000, model_ms))


# What /api/caption takes and answers. The decoding options' names, types, ranges and help come from
# their one table (decoding_options.py).
def _option_field(name: str) -> tuple[Any, Any]:
    f = OPTIONS[name]
    text = f.metadata["help"]
    if name not in LIMITS:
        return type(f.default) | None, Field(None, description=f"{text}; default: the model's")
    low, high = LIMITS[name]
    return type(f.default) | None, Field(None, ge=low, le=high, description=f"{text}; {low:g} to {high:g}; "
                                                                             "default: the model's")


class _Strict(BaseModel):
    """Unknown fields are refused: a misspelt option silently ignored would hand the client default
    decoding it did not ask for."""

    model_config = ConfigDict(extra="forbid")


Options = create_model("Options", __base__=_Strict, __doc__="Decoding options of a request; any left out take "
                       "the model's defaults.", **{name: _option_field(name) for name in OPTIONS},
                       attention=(bool, Field(False, description="also answer each word's attention map of the "
                                                                 "best caption")))


class JsonRequest(Options):
    image: str = Field(description="the image file, base64-encoded (a data: URL works too)")


class CaptionOut(BaseModel):
    generated_text: str
    score: float = Field(description="log-probability, length-normalised when length_penalty > 0")


class Timing(BaseModel):
    total_ms: float = Field(description="from the request's arrival to its answer")
    decode_ms: float = Field(description="reading, checking and resizing the image")
    queue_ms: float = Field(description="waiting for the batch")
    model_ms: float = Field(description="the batch's encoder and decoder pass")
    batch_size: int = Field(description="images in the batch this one ran in")


class AttentionOut(BaseModel):
    words: list[str]
    grid: list[int] = Field(description="[rows, columns] of the encoder's feature map")
    maps: list[list[list[float]]] = Field(description="one rows x columns map per word, summing to 1")


class ConceptOut(BaseModel):
    word: str = Field(description="a caption word for what the encoder's ImageNet head recognised")
    probability: float = Field(description="the head's probability of it, summed over the classes it names")


class NeighbourOut(BaseModel):
    caption: str = Field(description="a human caption of a similar photo, from the model's caption datastore")
    similarity: float = Field(description="cosine of the photo's vector and the caption's")


class SearchHit(BaseModel):
    file: str = Field(description="the photo's path in the library, as the JSONL names it; "
                                  "/api/thumbnail?file=... shows it")
    score: float = Field(description="cosine of the query and the photo's caption and concepts")
    caption: str
    concepts: list[ConceptOut]


class GeneratedText(BaseModel):
    generated_text: str


class CaptionResponse(BaseModel):
    model: str
    captions: list[CaptionOut]
    concepts: list[ConceptOut] = Field(description="what the encoder recognised, most probable first (for "
                                                   "tagging; captions mention the confident ones)")
    neighbours: list[NeighbourOut] | None = Field(None, description="a retrieval model's captions of similar "
                                                                    "photos, which it read while writing, nearest first")
    timing: Timing
    attention: AttentionOut | None = None


def model_info(captioner: Captioner) -> dict[str, Any]:
    """Name, content hash (the model's version: any retrained or re-exported model gets a new one) and shape."""
    h, w = captioner.encoder.grid()
    return {"name": captioner.name, "version": captioner.version, "encoder": captioner.encoder.name,
            "decoder": type(captioner.decoder).__name__, "grid": [h, w], "vocab_size": len(captioner.vocab)}


def invalid(err: ValidationError) -> RequestValidationError:
    """Pydantic's errors as FastAPI's 422, each located in the body like FastAPI's own; an unknown field's
    message lists the known ones, so a misspelling is easy to fix."""
    known = f"unknown field; the fields are {', '.join(JsonRequest.model_fields)}"
    return RequestValidationError([echo({**e, "loc": ("body", *e["loc"]), "msg": known if e["type"] == "extra_forbidden"
                                         else e["msg"]}) for e in err.errors(include_url=False)])


def echo(value: Any, limit: int = 100) -> Any:
    """A request's value as a 422 can quote it: JSON has no Infinity or NaN, a body need not be UTF-8, and
    a client needs the start of a long value (a whole base64 photo) to find it, not all of it."""
    if isinstance(value, dict):
        return {str(k): echo(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [echo(v, limit) for v in value]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if value is None or isinstance(value, (bool, int, float)) else echo(repr(value), limit)


def invalid_field(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 for one field, in the same form as pydantic's."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message,
                                    "input": echo(value)}])


def is_loopback(host: str) -> bool:
    """Whether binding to `host` serves this machine only (access control then defaults off)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def access_control(host: str, api_key: str | None, max_inflight_per_client: int | None
                   ) -> tuple[dict[str, Any], str]:
    """`captioner serve`'s access settings for `create_app`, and a warning for the console or "".

    The key comes from the flag, else from CAPTIONER_API_KEY (which keeps it out of the process list). The
    per-client limit is as given (0: off); not given, it is off on loopback and INFLIGHT_OFF_LOOPBACK when
    the server takes other machines' requests, where serving without a key earns the warning."""
    key = api_key or os.environ.get(API_KEY_ENV) or None
    local = is_loopback(host)
    if max_inflight_per_client is None:
        max_inflight_per_client = None if local else INFLIGHT_OFF_LOOPBACK
    warning = "" if local or key else (f"{host} takes requests from other machines and anyone who reaches it may "
                                       f"use it; set {API_KEY_ENV} (or --api-key) to require a key")
    return {"api_key": key, "max_inflight_per_client": max_inflight_per_client or None}, warning


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


# The request body as /docs shows it (the route reads the body itself, to take multipart and JSON alike).
OPENAPI_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}, **Options.model_json_schema()["properties"]}}},
    "application/json": {"schema": JsonRequest.model_json_schema()}}}}
RAW_BODY = {"requestBody": {"required": True, "content": {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
CAPTION_ERRORS = {400: {"description": "not an image, corrupt, truncated or too narrow; an empty body"},
                  401: {"description": "the server has an API key and the request did not bear it"},
                  413: {"description": "file or pixel count over the server's limits"},
                  415: {"description": "not multipart, JSON or an image body"},
                  422: {"description": "bad or unknown option"},
                  429: {"description": "this client has the most requests in flight the server allows"},
                  500: {"description": "a fault of the server; its log has the details under error_id"},
                  503: {"description": "the queue is full, or the server is shutting down"}}


def key_guard(api_key: str) -> Callable:
    """A route dependency that lets through only requests bearing the key (Authorization: Bearer KEY)."""
    bearer = HTTPBearer(auto_error=False, description="the server's --api-key")

    async def check_key(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not secrets.compare_digest(given, api_key.encode()):  # constant time: no guessing byte by byte
            raise HTTPException(401, "this server needs its API key: send the header Authorization: Bearer KEY",
                                headers={"WWW-Authenticate": "Bearer"})
    return check_key


def inflight_guard(limit: int) -> Callable:
    """A route dependency that answers 429 to a client address with `limit` requests already in flight."""
    inflight: dict[str, int] = {}  # client address -> requests being answered (only the event loop touches it)

    async def limit_inflight(request: Request) -> AsyncIterator[None]:
        client = request.client.host if request.client else ""
        if inflight.get(client, 0) >= limit:
            raise HTTPException(429, f"{limit} requests from {client} are already in flight, "
                                     "the most this server takes from one client; send the next when one "
                                     "has been answered", headers={"Retry-After": "1"})
        inflight[client] = inflight.get(client, 0) + 1
        try:
            yield
        finally:
            inflight[client] -= 1
            if not inflight[client]:
                del inflight[client]
    return limit_inflight


async def read_request(request: Request) -> tuple[bytes, str, dict]:
    """The image file, its name and the option fields of a multipart or JSON request, or of a raw image
    body (`image/*` or `application/octet-stream`, as Hugging Face clients send it) with the options in
    the query string; any other body, or an empty one, is refused with the status that says why."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind.startswith("image/") or kind in ("application/octet-stream", ""):  # no type: a client sending bytes
        data = await request.body()
        if not data:
            raise HTTPException(400, "empty body: send the image as multipart field 'image', as JSON, or as the "
                                     "body itself (image/*)")
        return data, "image", dict(request.query_params)
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=10)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(400, "multipart body has no file field 'image'")
        data = await upload.read()
        await form.close()
        fields = {k: v for k, v in form.items() if k != "image" and v != ""}
        return data, upload.filename or "image", fields
    if kind == "application/json":
        body = await request.body()
        if not body:
            raise HTTPException(400, "empty body: send JSON {\"image\": \"<base64>\", ...}")
        try:
            parsed = JsonRequest.model_validate_json(body)
        except ValidationError as err:
            raise invalid(err) from None
        text = parsed.image
        if text.startswith("data:"):
            _, comma, text = text.partition(",")
            if not comma:
                raise invalid_field("image", "a data: URL needs a comma before the base64 data", parsed.image)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise invalid_field("image", "image is not valid base64", text) from None
        return data, "image", parsed.model_dump(exclude={"image"}, exclude_none=True)
    raise HTTPException(415, f"content type {kind or '(none)'} is not multipart/form-data, application/json, "
                             "image/* or application/octet-stream")


def create_app(captioner: Captioner, *, max_batch_size: int = MAX_BATCH_SIZE, batch_wait_ms: float = BATCH_WAIT_MS,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, max_queue: int = MAX_QUEUE,
               examples: list[Path] | None = None, ui: bool = True, api_key: str | None = None,
               max_inflight_per_client: int | None = None, library: Library | None = None) -> Any:
    """The FastAPI app: /api/caption, /api/health, OpenAPI docs at /docs, and the Gradio UI at /; with a
    `library` (search.open_library), also /api/search, /api/thumbnail and a search box on the page.

    With `api_key`, /api/caption takes only requests bearing it (`Authorization: Bearer KEY`) and the page asks
    for it as a password; /api/health stays open for load balancers. `max_inflight_per_client` caps the
    captioning requests one client address may have in flight (429 beyond it)."""
    if max_inflight_per_client is not None and max_inflight_per_client < 1:
        raise ValueError("max_inflight_per_client must be >= 1")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty")
    batcher = Batcher(captioner, max_batch_size, batch_wait_ms, max_queue)
    info = model_info(captioner)
    slots = decode_slots()

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - the batcher starts with the first request
        yield
        await anyio.to_thread.run_sync(batcher.close)

    # FastAPIOffline: the /docs page from packaged Swagger UI files, not a CDN, so it works offline too
    app = FastAPIOffline(title="captioner", version=__version__, lifespan=lifespan,
                         description=f"Image captioning with {captioner.title}. The browser UI is at /.")
    app.state.batcher = batcher
    app.state.max_inflight_per_client = max_inflight_per_client
    app.add_middleware(BodyLimit, limit=max_upload_bytes * 4 // 3 + 65536, prefix="/api/")
    app.add_middleware(InternalErrors)  # outermost: it also covers the middleware and the page
    keyed = [Depends(key_guard(api_key))] if api_key else []
    guards = keyed + ([Depends(inflight_guard(max_inflight_per_client))] if max_inflight_per_client else [])

    @app.post("/api/caption", response_model=CaptionResponse, openapi_extra=OPENAPI_BODY, dependencies=guards,
              responses=CAPTION_ERRORS)
    async def caption(request: Request) -> CaptionResponse:
        """Caption one image: a multipart upload (field `image`) or JSON with the image in base64, and the
        decoding options as fields."""
        start = time.perf_counter()
        data, name, fields = await read_request(request)
        try:
            options = Options.model_validate(fields)
            opts = captioner.options(**options.model_dump(exclude={"attention"}))
        except ValidationError as err:
            raise invalid(err) from None
        except OptionError as err:
            raise invalid_field(err.field, str(err), fields.get(err.field)) from None
        pixels = await anyio.to_thread.run_sync(decode_upload, data, name, captioner, max_upload_bytes, max_pixels,
                                                limiter=slots)
        decoded = time.perf_counter()
        try:
            result = await batcher.caption(pixels, opts)
        except (Busy, Closed) as err:
            raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from None
        attention = None
        if options.attention:
            words, alphas = captioner.attention_maps(result.captions[0])
            attention = AttentionOut(words=words, grid=list(alphas.shape[1:]),
                                     maps=alphas.astype(np.float64).round(5).tolist())
        ms = [round(x, 2) for x in ((time.perf_counter() - start) * 1000, (decoded - start) * 1000,
                                    result.queue_ms, result.model_ms)]
        timing = Timing(total_ms=ms[0], decode_ms=ms[1], queue_ms=ms[2], model_ms=ms[3], batch_size=result.batch_size)
        return CaptionResponse(model=info["name"], captions=captioner.as_dicts(result.captions),
                               timing=timing, attention=attention,
                               **extras(Captioned(result.captions, result.concepts, neighbours=result.neighbours)))

    @app.post("/api/image-to-text", dependencies=guards, openapi_extra=RAW_BODY, responses=CAPTION_ERRORS)
    async def image_to_text(request: Request) -> list[GeneratedText]:
        """The Hugging Face Inference API's image-to-text: the image file as the body, decoding options in
        the query string; answers [{"generated_text": ...}], best first. `huggingface_hub`'s
        `InferenceClient(model="http://HOST:PORT/api/image-to-text").image_to_text(photo)` reads it."""
        answer = await caption(request)
        return [GeneratedText(generated_text=c.generated_text) for c in answer.captions]

    @app.get("/api/search", dependencies=keyed, responses={404: {"description": "the server has no library"}})
    async def search_library(q: str = Query(min_length=1, max_length=1000, description="what to look for"),
                             top: int = Query(10, ge=1, le=100)) -> list[SearchHit]:
        """Find photos of the server's captioned library (`--library`) by describing them, best first."""
        if library is None:
            raise HTTPException(404, NO_LIBRARY)
        return await anyio.to_thread.run_sync(library.find, q, top, limiter=slots)

    @app.get("/api/thumbnail", dependencies=keyed, response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}},
                        404: {"description": "no library, or not one of its photos (or unreadable)"}})
    async def library_thumbnail(file: str = Query(description="a photo's path as /api/search answers it")
                                ) -> Response:
        """A JPEG, at most 256 pixels a side, of one photo the library lists; no other file is served."""
        if library is None:
            raise HTTPException(404, NO_LIBRARY)
        data = await anyio.to_thread.run_sync(lambda: jpeg(thumbnail(library, file, max_pixels)), limiter=slots)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/api/health")
    async def health() -> dict:
        """The model's name and version (a hash of its weights), the package version, and batching counters."""
        return {"status": "ok", "model": info, "captioner_version": __version__, "device": str(captioner.device),
                "batching": {"max_batch_size": batcher.max_batch_size, "max_wait_ms": batcher.max_wait * 1000,
                             "batches": batcher.batches, "images": batcher.images}}

    if ui:
        import gradio as gr

        login = None
        if api_key:
            def login(user: str, password: str) -> bool:  # the page's login form: the key is the password
                return secrets.compare_digest(password.encode(), api_key.encode())

        app = gr.mount_gradio_app(app, build_ui(batcher, examples or [], max_pixels, slots, library), path="/",
                                  max_file_size=max_upload_bytes, footer_links=["api"], run_history=False,
                                  auth=login, auth_message="Any user name; the password is the server's API key.")
    return app


class InternalErrors:
    """ASGI middleware: an unexpected exception answers a generic 500 with an id and goes to the log, with
    its traceback, under that id. Its text (file paths, device messages) stays on the server."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as err:  # noqa: BLE001 - the one place unexpected errors end
            if scope["type"] != "http":
                raise
            error_id = secrets.token_hex(4)
            log.error("internal error %s answering %s %s", error_id, scope.get("method"), scope.get("path"),
                      exc_info=err)
            if not started:  # otherwise the client sees the answer cut short
                body = {"detail": "internal error; the server's log has the details", "error_id": error_id}
                await JSONResponse(body, status_code=500)(scope, receive, send)


class BodyLimit:
    """ASGI middleware refusing bodies over `limit` bytes before they are read into memory: at once from
    Content-Length, or by counting chunks as they arrive when the client streams without one."""

    def __init__(self, app: Any, limit: int, prefix: str = "/") -> None:
        self.app, self.limit, self.prefix = app, limit, prefix

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            return await self.app(scope, receive, send)
        message = f"request body is over the server's limit of {self.limit} bytes"
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            return await JSONResponse({"detail": message}, status_code=413)(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, message)
            return event

        await self.app(scope, counted, send)


def build_ui(batcher: Batcher, examples: list[Path], max_pixels: int = MAX_PIXELS,
             slots: anyio.CapacityLimiter | None = None, library: Library | None = None) -> Any:
    """The Gradio page: a photo (upload, webcam, clipboard or an example), beam size and length sliders,
    the n-best captions, and one attention heatmap per word of the best caption; with a `library`, a search
    box whose hits show as thumbnails (made here and handed to Gradio, so the page's login covers them too).

    Gradio hands over the photo's file path, not its pixels, so the pixel limit is checked from the header
    before anything is decoded; decoding, resizing and the heatmaps run in `slots`, the pool the API decodes
    in, so a large photo on the page never holds up the event loop that answers everyone else."""
    import gradio as gr

    from . import visualize

    captioner = batcher.captioner
    slots = slots or decode_slots()

    def prepare(photo: str) -> tuple[torch.Tensor, Image.Image]:
        picture = read_photo(photo, Path(photo).name, max_pixels)  # by its name: no server paths in messages
        return captioner.encoder.preprocess(picture), captioner.encoder.crop(picture)

    def draw(crop: Image.Image, words: list[str], alphas: np.ndarray) -> list[tuple[Image.Image, str]]:
        return [(visualize.attention_overlay(crop, alpha), word) for word, alpha in zip(words, alphas)]

    async def run(photo: str | None, *values: float | bool
                  ) -> tuple[str, dict[str, float], list[list], list[list], list[tuple[Image.Image, str]]]:
        if photo is None:
            raise gr.Error("Upload a photo, take one with the webcam, or pick an example first.")
        chosen = {name: type(OPTIONS[name].default)(value) for name, value in zip(OPTIONS, values)}
        chosen["num_captions"] = min(chosen["num_captions"], chosen["beam_size"])
        try:
            opts = captioner.options(**chosen)
        except OptionError as err:
            raise gr.Error(str(err)) from None
        try:
            pixels, crop = await anyio.to_thread.run_sync(prepare, photo, limiter=slots)
            result = await batcher.caption(pixels, opts)
        except (ImageError, Busy, Closed) as err:
            raise gr.Error(str(err)) from None
        nbest = captioner.as_dicts(result.captions)
        words, alphas = captioner.attention_maps(result.captions[0])
        heatmaps = await anyio.to_thread.run_sync(draw, crop, words, alphas, limiter=slots)
        table = [[rank, c["generated_text"], c["score"]] for rank, c in enumerate(nbest, 1)]
        similar = [[text, round(sim, 3)] for text, sim in result.neighbours]
        return nbest[0]["generated_text"], dict(result.concepts), table, similar, heatmaps

    def thumbnails(query: str) -> list[tuple[Image.Image, str]]:
        hits = []
        for hit in library.find(query) if query.strip() else []:
            label = f"{hit['caption']} ({hit['score']:.2f}) {hit['file']}"
            try:
                hits.append((thumbnail(library, hit["file"], max_pixels), label))
            except HTTPException:  # listed, but gone or unreadable since: left out
                continue
        return hits

    async def find(query: str) -> list[tuple[Image.Image, str]]:
        return await anyio.to_thread.run_sync(thumbnails, query, limiter=slots)

    defaults = captioner.defaults
    with gr.Blocks(title="captioner") as demo:
        gr.Markdown(f"## captioner\n{captioner.title[0].upper()}{captioner.title[1:]}, model `{captioner.name}`. "
                    "Pick a photo; the captions come with a heatmap of where the model looked for each word. "
                    "REST API: [/docs](/docs).")
        with gr.Row():
            with gr.Column(scale=2):
                # a file path, and image_mode=None so Gradio does not convert (decode) the photo itself
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "webcam", "clipboard"],
                                 label="Photo", elem_id="photo", height=320)
                controls = [page_control(gr, name, defaults) for name in OPTIONS]
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example photos")
            with gr.Column(scale=3):
                best = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                tags = gr.Label(label="What the encoder recognises (ImageNet concepts, as tags)", num_top_classes=5,
                                elem_id="concepts")
                table = gr.Dataframe(headers=["rank", "caption", "score"], label="Beam search's n-best",
                                     interactive=False, elem_id="nbest")
                similar = gr.Dataframe(headers=["caption", "similarity"], label="Captions of similar photos (what a "
                                       "retrieval model read while writing)", interactive=False, elem_id="neighbours",
                                       visible=captioner.datastore is not None)
                gallery = gr.Gallery(label="Attention, word by word", columns=5, height="auto", elem_id="attention")
        inputs, outputs = [image, *controls], [best, tags, table, similar, gallery]
        button.click(run, inputs, outputs, concurrency_limit=None, api_name="caption")
        image.upload(run, inputs, outputs, concurrency_limit=None, api_visibility="private")
        if library is not None:
            gr.Markdown(f"### Search the library\n{len(library.records)} captioned photos; describe what to find.")
            query = gr.Textbox(label="Find photos", placeholder="two dogs on a beach", elem_id="search")
            found = gr.Gallery(label="Best matches", columns=5, height="auto", elem_id="search-results")
            query.submit(find, [query], [found], concurrency_limit=None, api_name="search")
    return demo


def page_control(gr: Any, name: str, defaults: DecodingOptions) -> Any:
    """The page's control of one decoding option, from its row in the table: a slider over its range,
    or a checkbox. The page shows 3 captions unless the beam is narrower."""
    f = OPTIONS[name]
    label, value = name.replace("_", " ").capitalize(), getattr(defaults, name)
    if name == "num_captions":
        value = min(3, defaults.beam_size)
    if name not in LIMITS:
        return gr.Checkbox(value=value, label=label, info=f.metadata["help"])
    low, high = LIMITS[name]
    step = 1 if type(f.default) is int else 0.1
    return gr.Slider(low, high, value=value, step=step, label=label, info=f.metadata["help"], elem_id=name)


def example_photos(folder: str | Path | None = None) -> list[Path]:
    """The photos the UI offers as examples: the given folder, or the repository's examples/photos."""
    root = Path(folder) if folder else Path(__file__).resolve().parent.parent / "examples" / "photos"
    return expand_inputs([str(root)]) if root.is_dir() else []
