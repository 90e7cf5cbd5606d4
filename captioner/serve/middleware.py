"""ASGI middleware around the whole app and its error handlers: a body over the limit is refused before it is
read, a request refused (4xx) is one line in the log, and an unexpected error answers a bare 500 with an id
while its traceback goes to the log under that id."""
from __future__ import annotations

import logging
import secrets
from typing import Any, cast

from fastapi import HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("captioner.serve")  # the package's name: the one operators filter the server's log by


def log_refusal(method: str, path: str, status: int, reason: str) -> None:
    """One line, whatever the reason holds (a file name may hold a newline): a refused request is the
    client's mistake, not the server's, so it gets no traceback; those are for the 500s."""
    log.warning("%s %s %d: %s", method, path, status, " ".join(reason.split()))


async def refused(request: Request, exc: Exception) -> Response:
    """FastAPI's own answer to an HTTPException or a 422, and its reason in the log (`log_refusal`)."""
    response: Response
    if isinstance(exc, RequestValidationError):
        response = await request_validation_exception_handler(request, exc)
        reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    else:  # create_app hands it only these two
        error = cast(StarletteHTTPException, exc)
        response = await http_exception_handler(request, error)
        reason = str(error.detail)
    log_refusal(request.method, request.url.path, response.status_code, reason)
    return response


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
            log_refusal(scope["method"], scope["path"], 413, message)
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
