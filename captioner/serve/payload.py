"""Reading a request's body: the image file and its options from multipart, JSON (ours, or Hugging Face's
{"inputs": ...} on /api/image-to-text) or a raw image body, and the 422s that name the field at fault in the
form FastAPI's own take."""
from __future__ import annotations

import base64
import binascii
import math
from typing import Any

import pydantic_core
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from .schemas import HuggingFaceRequest, JsonRequest, Options


def invalid_body(err: ValidationError, model: type[BaseModel] = JsonRequest) -> RequestValidationError:
    """Pydantic's errors of `model` as FastAPI's 422, each located in the body like FastAPI's own; an unknown
    field's message lists the known ones, so a misspelling is easy to fix. Only what the request sent (its
    values and field names) is shortened; the messages are the server's, and a cut list of fields would
    hide the very one the client was looking for."""
    errors = []
    for e in err.errors(include_url=False):
        message = e["msg"]
        if e["type"] == "extra_forbidden":  # a nested one is an option in Hugging Face's "parameters"
            known = Options.model_fields if len(e["loc"]) > 1 else model.model_fields
            message = f"unknown field; the fields are {', '.join(known)}"
        errors.append({**quotable(e), "loc": ("body", *quotable(list(e["loc"]))), "msg": message})
    return RequestValidationError(errors)


def quotable(value: Any, limit: int = 100) -> Any:
    """A request's value as a 422 can quote it: JSON has no Infinity or NaN, a body need not be UTF-8, and
    a client needs the start of a long value (a whole base64 photo) to find it, not all of it."""
    if isinstance(value, dict):
        return {str(k): quotable(v, limit) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [quotable(v, limit) for v in value]
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "..."
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value if value is None or isinstance(value, (bool, int, float)) else quotable(repr(value), limit)


def invalid_field(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 for one field, in the same form as pydantic's."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message,
                                    "input": quotable(value)}])


def from_base64(text: str) -> bytes:
    """The bytes of base64 text, or of a base64 data: URL (what a browser's FileReader gives); ValueError
    saying what is wrong."""
    if text.startswith("data:"):
        _, comma, text = text.partition(",")
        if not comma:
            raise ValueError("a data: URL needs a comma before the base64 data")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("not valid base64: send the image file's bytes base64-encoded, on one line") from None


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_hugging_face(request: Request) -> tuple[bytes, str, dict]:
    """What `read_request` reads, and Hugging Face's JSON: {"inputs": "<base64>", "parameters": {options}},
    which its clients send when given parameters (the image alone they send as the body). Bad base64 there
    is a 400, as Hugging Face answers it."""
    if media_type(request) == "application/json":
        try:
            parsed = pydantic_core.from_json(await request.body())
        except ValueError:
            parsed = None  # not JSON: read_request answers it the 4xx it answers /api/caption
        if isinstance(parsed, dict) and "inputs" in parsed:
            try:
                values = HuggingFaceRequest.model_validate(parsed).model_dump(exclude_none=True)
            except ValidationError as err:
                raise invalid_body(err, HuggingFaceRequest) from None
            try:
                data = from_base64(values["inputs"])
            except ValueError as err:
                raise HTTPException(400, f"inputs: {err}") from None
            return data, "inputs", values.get("parameters", {})
    return await read_request(request)


async def read_request(request: Request) -> tuple[bytes, str, dict]:
    """The image file, its name and the option fields of a multipart or JSON request, or of a raw image
    body (`image/*` or `application/octet-stream`, as Hugging Face clients send it) with the options in
    the query string; any other body, or an empty one, is refused with the status that says why."""
    kind = media_type(request)
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
            values = JsonRequest.model_validate_json(body).model_dump(exclude_none=True)
        except ValidationError as err:
            raise invalid_body(err) from None
        given: str = values.pop("image")
        try:
            data = from_base64(given)
        except ValueError as err:
            raise invalid_field("image", f"image: {err}", given) from None
        return data, "image", values
    raise HTTPException(415, f"content type {kind or '(none)'} is not multipart/form-data, application/json, "
                             "image/* or application/octet-stream")
