"""`captioner serve`: a REST API (FastAPI) and a browser UI (Gradio) in one process, sharing one model.

Requests from both faces go through one `Batcher`: a worker thread that owns the model and gathers the
requests that arrive within a few milliseconds of each other into one encoder and decoder pass. Everything
that can fail on user input (size, base64, decoding, pixel count, options) is checked in the request's own
thread before it reaches the batch, so a bad request gets its 4xx and never costs anyone else theirs.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from . import __version__
from .data import ImageError, ImageTooLarge, expand_inputs, load_image
from .decoding import Caption
from .pipeline import LIMITS, Captioner, DecodingOptions, OptionError

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 50_000_000  # a 48-megapixel phone photo passes; decompression bombs (gigapixels) do not
MAX_BATCH_SIZE = 16
BATCH_WAIT_MS = 20.0  # long enough for a client's next request to make the batch (docs/BENCHMARKS.md)
MAX_QUEUE = 256


class Busy(RuntimeError):
    """The batcher's queue is full: the server answers 503 rather than letting latency and memory grow."""


@dataclass
class Result:
    """One image's n-best captions and what its batch cost."""

    captions: list[Caption]
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
    """Dynamic batching: the first request of a batch waits at most `max_wait_ms` for others, then all of
    them (up to `max_batch_size`, grouped by decoding options) run as one batch. Alone, a client pays at most
    the wait; under load, requests share passes, so throughput grows with the number of clients.
    `max_batch_size=1` turns batching off. One thread runs the model, so its CPU threads never compete."""

    def __init__(self, captioner: Captioner, max_batch_size: int = MAX_BATCH_SIZE, max_wait_ms: float = BATCH_WAIT_MS,
                 max_queue: int = MAX_QUEUE) -> None:
        if max_batch_size < 1 or max_wait_ms < 0 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self.captioner, self.max_batch_size, self.max_wait = captioner, max_batch_size, max_wait_ms / 1000
        self.max_queue = max_queue
        self.batches = self.images = 0
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="captioner-batcher", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Finish the queued work, then stop the worker."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, pixels: torch.Tensor, opts: DecodingOptions) -> Future:
        """Queue one preprocessed image (3, S, S); the future gives its `Result`."""
        if self._queue.qsize() >= self.max_queue:
            raise Busy(f"{self.max_queue} images are waiting for the model; try again shortly")
        self.start()
        future: Future = Future()
        self._queue.put(_Job(pixels, opts, future, time.perf_counter()))
        return future

    async def caption(self, pixels: torch.Tensor, opts: DecodingOptions) -> Result:
        return await asyncio.wrap_future(self.submit(pixels, opts))

    def _gather(self) -> list[_Job] | None:
        first = self._queue.get()
        if first is None:
            return None
        jobs = [first]
        deadline = time.perf_counter() + self.max_wait
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
        for job, nbest in zip(jobs, captions):
            job.future.set_result(Result(nbest, len(jobs), (start - job.queued) * 1000, model_ms))


# What /api/caption takes and answers; the ranges come from the pipeline's one table, LIMITS.
def _limit(name: str) -> Any:
    low, high = LIMITS[name]
    return Field(None, ge=low, le=high, description=f"{low:g} to {high:g}; default: the model's")


class Options(BaseModel):
    """Decoding options of a request; any left out take the model's defaults."""

    beam_size: int | None = _limit("beam_size")
    max_length: int | None = _limit("max_length")
    num_captions: int | None = _limit("num_captions")
    length_penalty: float | None = _limit("length_penalty")
    attention: bool = Field(False, description="also answer each word's attention map of the best caption")


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


class CaptionResponse(BaseModel):
    model: str
    captions: list[CaptionOut]
    timing: Timing
    attention: AttentionOut | None = None


def model_info(captioner: Captioner) -> dict[str, Any]:
    """Name, content hash (the model's version: any retrained or re-exported model gets a new one) and shape."""
    h, w = captioner.encoder.grid()
    return {"name": captioner.name, "version": captioner.version, "encoder": captioner.encoder.name,
            "decoder": type(captioner.decoder).__name__, "grid": [h, w], "vocab_size": len(captioner.vocab)}


def invalid(err: ValidationError) -> RequestValidationError:
    """Pydantic's errors as FastAPI's 422, each located in the body like FastAPI's own."""
    return RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)])


def invalid_field(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 for one field, in the same form as pydantic's."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def decode_upload(data: bytes, name: str, captioner: Captioner, max_bytes: int, max_pixels: int) -> torch.Tensor:
    """Bytes -> the encoder's input tensor; raises the HTTP error that says what is wrong."""
    if not data:
        raise HTTPException(400, f"{name}: empty image")
    if len(data) > max_bytes:
        raise HTTPException(413, f"{name}: {len(data)} bytes is more than the limit of {max_bytes}")
    try:
        image = load_image(data, max_pixels=max_pixels, name=name)
    except ImageError as err:
        raise HTTPException(413 if isinstance(err, ImageTooLarge) else 400, str(err)) from None
    return captioner.encoder.preprocess(image)


def create_app(captioner: Captioner, *, max_batch_size: int = MAX_BATCH_SIZE, batch_wait_ms: float = BATCH_WAIT_MS,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, max_queue: int = MAX_QUEUE,
               examples: list[Path] | None = None, ui: bool = True) -> Any:
    """The FastAPI app: /api/caption, /api/health, OpenAPI docs at /docs, and the Gradio UI at /."""
    batcher = Batcher(captioner, max_batch_size, batch_wait_ms, max_queue)
    info = model_info(captioner)
    decode_slots = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))  # bounds decoded pixels in memory at once

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 - the batcher starts with the first request
        yield
        await anyio.to_thread.run_sync(batcher.close)

    # FastAPIOffline: the /docs page from packaged Swagger UI files, not a CDN, so it works offline too
    app = FastAPIOffline(title="captioner", version=__version__, lifespan=lifespan,
                         description="Image captioning with a Show, Attend and Tell model. The browser UI is at /.")
    app.state.batcher = batcher
    app.add_middleware(BodyLimit, limit=max_upload_bytes * 4 // 3 + 65536, prefix="/api/")

    async def read_request(request: Request) -> tuple[bytes, str, dict]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
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
            text = parsed.image.split(",", 1)[1] if parsed.image.startswith("data:") else parsed.image
            try:
                data = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise invalid_field("image", "image is not valid base64", text[:40]) from None
            return data, "image", parsed.model_dump(exclude={"image"}, exclude_none=True)
        if not kind and not await request.body():
            raise HTTPException(400, "empty body: send the image as multipart field 'image' or as JSON")
        raise HTTPException(415, f"content type {kind or '(none)'} is not multipart/form-data or application/json")

    openapi_body = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, **Options.model_json_schema()["properties"]}}},
        "application/json": {"schema": JsonRequest.model_json_schema()}}}}

    @app.post("/api/caption", response_model=CaptionResponse, openapi_extra=openapi_body,
              responses={400: {"description": "not an image, corrupt or truncated, or an empty body"},
                         413: {"description": "file or pixel count over the server's limits"},
                         415: {"description": "neither multipart nor JSON"}, 422: {"description": "bad option"},
                         503: {"description": "the queue is full"}})
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
                                                limiter=decode_slots)
        decoded = time.perf_counter()
        try:
            result = await batcher.caption(pixels, opts)
        except Busy as err:
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
                               timing=timing, attention=attention)

    @app.get("/api/health")
    async def health() -> dict:
        """The model's name and version (a hash of its weights), the package version, and batching counters."""
        return {"status": "ok", "model": info, "captioner_version": __version__, "device": str(captioner.device),
                "batching": {"max_batch_size": batcher.max_batch_size, "max_wait_ms": batcher.max_wait * 1000,
                             "batches": batcher.batches, "images": batcher.images}}

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"internal error: {type(err).__name__}: {err}"}, status_code=500)

    if ui:
        import gradio as gr

        app = gr.mount_gradio_app(app, build_ui(batcher, examples or [], max_pixels), path="/",
                                  max_file_size=max_upload_bytes, footer_links=["api"], run_history=False)
    return app


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


def build_ui(batcher: Batcher, examples: list[Path], max_pixels: int = MAX_PIXELS) -> Any:
    """The Gradio page: a photo (upload, webcam, clipboard or an example), beam size and length sliders,
    the n-best captions, and one attention heatmap per word of the best caption."""
    import gradio as gr

    from .visualize import attention_overlay

    captioner = batcher.captioner

    async def run(image: Image.Image | None, beam_size: float, max_length: float, num_captions: float
                  ) -> tuple[str, list[list], list[tuple[Image.Image, str]]]:
        if image is None:
            raise gr.Error("Upload a photo, take one with the webcam, or pick an example first.")
        try:
            picture = load_image(image, max_pixels=max_pixels)
        except ImageError as err:
            raise gr.Error(str(err)) from None
        beam = int(beam_size)
        opts = captioner.options(beam_size=beam, max_length=int(max_length), num_captions=min(int(num_captions), beam))
        try:
            result = await batcher.caption(captioner.encoder.preprocess(picture), opts)
        except Busy as err:
            raise gr.Error(str(err)) from None
        nbest = captioner.as_dicts(result.captions)
        words, alphas = captioner.attention_maps(result.captions[0])
        crop = captioner.encoder.crop(picture)
        heatmaps = [(attention_overlay(crop, alpha), word) for word, alpha in zip(words, alphas)]
        table = [[rank, c["generated_text"], c["score"]] for rank, c in enumerate(nbest, 1)]
        return nbest[0]["generated_text"], table, heatmaps

    defaults = captioner.defaults
    with gr.Blocks(title="captioner") as demo:
        gr.Markdown(f"## captioner\nShow, Attend and Tell, model `{captioner.name}`. "
                    "Pick a photo; the captions come with a heatmap of where the model looked for each word. "
                    "REST API: [/docs](/docs).")
        with gr.Row():
            with gr.Column(scale=2):
                image = gr.Image(type="pil", sources=["upload", "webcam", "clipboard"], label="Photo",
                                 elem_id="photo", height=320)
                beam_size = gr.Slider(1, 10, value=defaults.beam_size, step=1, label="Beam size")
                max_length = gr.Slider(5, int(LIMITS["max_length"][1]), value=defaults.max_length, step=1,
                                       label="Maximum length (words)")
                num_captions = gr.Slider(1, 10, value=3, step=1, label="Captions to show",
                                         info="at most the beam size")
                button = gr.Button("Caption", variant="primary", elem_id="caption-button")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[image], label="Example photos")
            with gr.Column(scale=3):
                best = gr.Textbox(label="Caption", elem_id="caption", interactive=False)
                table = gr.Dataframe(headers=["rank", "caption", "score"], label="Beam search's n-best",
                                     interactive=False, elem_id="nbest")
                gallery = gr.Gallery(label="Attention, word by word", columns=5, height="auto", elem_id="attention")
        inputs, outputs = [image, beam_size, max_length, num_captions], [best, table, gallery]
        button.click(run, inputs, outputs, concurrency_limit=None, api_name="caption")
        image.upload(run, inputs, outputs, concurrency_limit=None, api_visibility="private")
    return demo


def example_photos(folder: str | Path | None = None) -> list[Path]:
    """The photos the UI offers as examples: the given folder, or the repository's examples/photos."""
    root = Path(folder) if folder else Path(__file__).resolve().parent.parent / "examples" / "photos"
    return expand_inputs([str(root)]) if root.is_dir() else []
