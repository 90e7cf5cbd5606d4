"""Who may use the server: the API key and the cap on one client's requests in flight, as route
dependencies, the defaults `captioner serve` picks from the address it binds to, and the other origins
whose pages may call it from a browser."""
from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from fastapi import HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

INFLIGHT_OFF_LOOPBACK = 8  # --max-inflight-per-client when serving other machines and not given
API_KEY_ENV = "CAPTIONER_API_KEY"


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


def check_origins(origins: list[str]) -> None:
    """Refuse what no browser sends as its Origin (a path, a trailing slash, no scheme): such an entry would
    match nothing and the page it was meant for would be refused without a word."""
    for origin in origins:
        parts = urlsplit(origin)
        if origin != "*" and (parts.scheme not in ("http", "https") or not parts.netloc
                              or origin != f"{parts.scheme}://{parts.netloc}"):
            raise ValueError(f"CORS origin {origin!r} is not an origin: give the scheme and host (and port) a "
                             "browser sends, like https://example.com or http://localhost:3000, or * for any")
