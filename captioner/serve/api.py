"""The REST API: the routes, at module level, and `create_app`, which puts them, the guards, the middleware
and the page together around one `Batcher`.

Everything that can fail on user input (size, base64, decoding, pixel count, shape, options) is checked in the
request's own thread before it reaches the batch, so a bad request gets its 4xx and never costs anyone else
theirs. The routes find the model, batcher and limits of their app in `request.app.state.server`.
"""
from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..decoding_options import OptionError
from ..pipeline import Captioner, CaptionResult, extras
from ..search import Library
from .batcher import BATCH_WAIT_MS, MAX_BATCH_SIZE, MAX_QUEUE, Batcher, Busy, Closed
from .guards import check_origins, inflight_guard, key_guard
from .middleware import BodyLimit, InternalErrors, refused
from .payload import invalid_body, invalid_field, read_hugging_face, read_request
from .photos import MAX_PIXELS, MAX_UPLOAD_BYTES, decode_slots, decode_upload, jpeg, thumbnail
from .schemas import (
    CAPTION_ERRORS,
    OPENAPI_BODY,
    RAW_BODY,
    AttentionOut,
    CaptionResponse,
    GeneratedText,
    Options,
    SearchHit,
    Timing,
)
from .ui import build_ui

NO_LIBRARY = ("this server has no library to search: start it with `captioner serve --library captions.jsonl "
              "--photos LIBRARY/`")

# Grouped by who may call them: `create_app` includes each group with its guards.
captioning = APIRouter()  # the API key and the per-client cap on requests in flight
library_routes = APIRouter()  # the API key
open_routes = APIRouter()  # no guard: load balancers ask /api/health


@dataclass
class Server:
    """What the routes of one app share: the model, its batcher, the decoding pool and the limits."""

    captioner: Captioner
    batcher: Batcher
    info: dict[str, Any]
    slots: anyio.CapacityLimiter
    library: Library | None
    max_upload_bytes: int
    max_pixels: int


def server_of(request: Request) -> Server:
    return request.app.state.server


def model_info(captioner: Captioner) -> dict[str, Any]:
    """Name, content hash (the model's version: any retrained or re-exported model gets a new one) and shape."""
    h, w = captioner.encoder.grid()
    return {"name": captioner.name, "version": captioner.version, "encoder": captioner.encoder.name,
            "decoder": type(captioner.decoder).__name__, "grid": [h, w], "vocab_size": len(captioner.vocab)}


@captioning.post("/api/caption", response_model=CaptionResponse, openapi_extra=OPENAPI_BODY,
                 responses=CAPTION_ERRORS)
async def caption(request: Request) -> CaptionResponse:
    """Caption one image: a multipart upload (field `image`) or JSON with the image in base64, and the
    decoding options as fields."""
    return await caption_read(request, read_request)


async def caption_read(request: Request, read: Callable[[Request], Awaitable[tuple[bytes, str, dict]]]
                       ) -> CaptionResponse:
    """/api/caption's answer to a request whose image, name and options `read` takes from its body."""
    start = time.perf_counter()
    server = server_of(request)
    captioner = server.captioner
    data, name, fields = await read(request)
    try:
        chosen = Options.model_validate(fields).model_dump()
        attend = chosen.pop("attention")
        opts = captioner.options(**chosen)
    except ValidationError as err:
        raise invalid_body(err) from None
    except OptionError as err:
        raise invalid_field(err.field, str(err), fields.get(err.field)) from None
    pixels = await anyio.to_thread.run_sync(decode_upload, data, name, captioner, server.max_upload_bytes,
                                            server.max_pixels, limiter=server.slots)
    decoded = time.perf_counter()
    try:
        result = await server.batcher.caption(pixels, opts)
    except (Busy, Closed) as err:
        raise HTTPException(503, str(err), headers={"Retry-After": "1"}) from None
    attention = None
    if attend:
        words, alphas = captioner.attention_maps(result.captions[0])
        attention = AttentionOut(words=words, grid=list(captioner.encoder.grid()),
                                 maps=alphas.astype(np.float64).round(5).tolist() if alphas is not None else [])
    ms = [round(x, 2) for x in ((time.perf_counter() - start) * 1000, (decoded - start) * 1000,
                                result.queue_ms, result.model_ms)]
    timing = Timing(total_ms=ms[0], decode_ms=ms[1], queue_ms=ms[2], model_ms=ms[3], batch_size=result.batch_size)
    found = CaptionResult(result.captions, result.concepts, neighbours=result.neighbours)
    return CaptionResponse.model_validate({
        "model": server.info["name"], "captions": captioner.as_dicts(result.captions), "timing": timing,
        "attention": attention, **extras(found)})


@captioning.post("/api/image-to-text", openapi_extra=RAW_BODY, responses=CAPTION_ERRORS)
async def image_to_text(request: Request) -> list[GeneratedText]:
    """The Hugging Face Inference API's image-to-text: the image file as the body, decoding options in
    the query string, or its JSON {"inputs": "<base64>", "parameters": {options}}; answers
    [{"generated_text": ...}], best first. `huggingface_hub`'s
    `InferenceClient(model="http://HOST:PORT/api/image-to-text").image_to_text(photo)` reads it."""
    answer = await caption_read(request, read_hugging_face)
    return [GeneratedText(generated_text=c.generated_text) for c in answer.captions]


@library_routes.get("/api/search", responses={404: {"description": "the server has no library"}})
async def search_library(request: Request,
                         q: str = Query(min_length=1, max_length=1000, description="what to look for"),
                         top: int = Query(10, ge=1, le=100)) -> list[SearchHit]:
    """Find photos of the server's captioned library (`--library`) by describing them, best first."""
    server = server_of(request)
    if server.library is None:
        raise HTTPException(404, NO_LIBRARY)
    hits = await anyio.to_thread.run_sync(server.library.find, q, top, limiter=server.slots)
    return [SearchHit.model_validate(hit) for hit in hits]


@library_routes.get("/api/thumbnail", response_class=Response,
                    responses={200: {"content": {"image/jpeg": {}}},
                               404: {"description": "no library, or not one of its photos (or unreadable)"}})
async def library_thumbnail(request: Request,
                            file: str = Query(description="a photo's path as /api/search answers it")) -> Response:
    """A JPEG, at most 256 pixels a side, of one photo the library lists; no other file is served."""
    server = server_of(request)
    library = server.library
    if library is None:
        raise HTTPException(404, NO_LIBRARY)
    data = await anyio.to_thread.run_sync(lambda: jpeg(thumbnail(library, file, server.max_pixels)),
                                          limiter=server.slots)
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@open_routes.get("/api/health")
async def health(request: Request) -> dict:
    """The model's name and version (a hash of its weights), the package version, and batching counters."""
    server = server_of(request)
    batcher = server.batcher
    return {"status": "ok", "model": server.info, "captioner_version": __version__,
            "device": str(server.captioner.device),
            "batching": {"max_batch_size": batcher.max_batch_size, "max_wait_ms": batcher.max_wait * 1000,
                         "batches": batcher.batches, "images": batcher.images}}


def create_app(captioner: Captioner, *, max_batch_size: int = MAX_BATCH_SIZE, batch_wait_ms: float = BATCH_WAIT_MS,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, max_queue: int = MAX_QUEUE,
               examples: list[Path] | None = None, ui: bool = True, api_key: str | None = None,
               max_inflight_per_client: int | None = None, library: Library | None = None,
               cors_origins: list[str] | None = None) -> Any:
    """The FastAPI app: /api/caption, /api/health, OpenAPI docs at /docs, and the Gradio UI at /; with a
    `library` (search.open_library), also /api/search, /api/thumbnail and a search box on the page.

    With `api_key`, /api/caption takes only requests bearing it (`Authorization: Bearer KEY`) and the page asks
    for it as a password; /api/health stays open for load balancers. `max_inflight_per_client` caps the
    captioning requests one client address may have in flight (429 beyond it). `cors_origins` lets pages
    served from those origins (`https://example.com`) call the API from a browser; no other origin may."""
    if max_inflight_per_client is not None and max_inflight_per_client < 1:
        raise ValueError("max_inflight_per_client must be >= 1")
    if api_key is not None and not api_key:
        raise ValueError("api_key must not be empty")
    check_origins(cors_origins or [])
    batcher = Batcher(captioner, max_batch_size, batch_wait_ms, max_queue)
    server = Server(captioner, batcher, model_info(captioner), decode_slots(), library, max_upload_bytes, max_pixels)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:  # the batcher starts with the first request
        yield
        await anyio.to_thread.run_sync(batcher.close)

    # FastAPIOffline: the /docs page from packaged Swagger UI files, not a CDN, so it works offline too
    app = FastAPIOffline(title="captioner", version=__version__, lifespan=lifespan,
                         description=f"Image captioning with {captioner.title}. The browser UI is at /.")
    app.state.server = server
    app.state.batcher = batcher
    app.state.max_inflight_per_client = max_inflight_per_client
    app.add_exception_handler(StarletteHTTPException, refused)  # a 4xx: one line in the log, no traceback
    app.add_exception_handler(RequestValidationError, refused)
    app.add_middleware(BodyLimit, limit=max_upload_bytes * 4 // 3 + 65536, prefix="/api/")
    app.add_middleware(InternalErrors)  # it also covers the middleware and the page
    if cors_origins:  # outermost: its headers go on every answer, a 413 or a 500 too, or the browser hides it
        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
    keyed = [Depends(key_guard(api_key))] if api_key else []
    guards = keyed + ([Depends(inflight_guard(max_inflight_per_client))] if max_inflight_per_client else [])
    app.include_router(captioning, dependencies=guards)
    app.include_router(library_routes, dependencies=keyed)
    app.include_router(open_routes)

    if ui:
        import gradio as gr

        login = None
        if api_key:
            def login(user: str, password: str) -> bool:  # the page's login form: the key is the password
                return secrets.compare_digest(password.encode(), api_key.encode())

        app = gr.mount_gradio_app(app, build_ui(batcher, examples or [], max_pixels, server.slots, library), path="/",
                                  max_file_size=max_upload_bytes, footer_links=["api"], run_history=False,
                                  auth=login, auth_message="Any user name; the password is the server's API key.")
    return app
