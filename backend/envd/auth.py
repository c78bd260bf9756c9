"""Access-token check for every endpoint but /health, as an ASGI middleware.

It sits in front of routing, so it covers HTTP and WebSocket alike, unknown paths included
(a prober learns nothing about which routes exist).
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from . import protocol

TOKEN_HEADER = protocol.TOKEN_HEADER.lower().encode()
TOKEN_QUERY = protocol.TOKEN_QUERY
OPEN_PATHS = frozenset({protocol.HEALTH_PATH})


def token_matches(expected: str | None, given: str | None) -> bool:
    if expected is None:
        return True
    if given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


def _given_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == TOKEN_HEADER:
            token: str = value.decode("latin-1")
            return token
    if scope["type"] == "websocket":
        # Browsers cannot set headers on a WebSocket handshake.
        raw: bytes = scope.get("query_string", b"")
        query: dict[str, list[str]] = parse_qs(raw.decode("latin-1"))
        values = query.get(TOKEN_QUERY)
        if values:
            return values[0]
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, expected_token: Callable[[], str | None]) -> None:
        self.app = app
        self.expected_token = expected_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if token_matches(self.expected_token(), _given_token(scope)):
            await self.app(scope, receive, send)
            return
        body = json.dumps(
            {"error": "unauthorized", "message": "missing or wrong X-Access-Token"},
            separators=(",", ":"),
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        elif "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": 401, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 4401})
