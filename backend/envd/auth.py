"""Access-token check for every endpoint but /health, as an ASGI middleware.

It sits in front of routing, so it covers HTTP and WebSocket alike, unknown paths included
(a prober learns nothing about which routes exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import protocol
from .state import RuntimeState

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


TOKEN_WAIT_S = 10.0
"""How long a request waits for the first token (the host's metadata is one poll away)."""


class AuthMiddleware:
    """The token check, and the end of everything opened under a token once it is replaced:
    a stream or WebSocket that outlived its token would keep an old key working."""

    def __init__(self, app: ASGIApp, state: RuntimeState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.access_token is None and state.token_required:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TOKEN_WAIT_S):
                    await state.token_changed().wait()
            if state.access_token is None:
                await _refuse(scope, send, 503, "no_token", "envd has no access token yet")
                return
        if not token_matches(state.access_token, _given_token(scope)):
            await _refuse(scope, send, 401, "unauthorized", "missing or wrong X-Access-Token")
            return
        if scope.get("path") == protocol.INIT_PATH:
            # Short, and the one request that replaces the token itself.
            await self.app(scope, receive, send)
            return
        await self._until_token_changes(scope, receive, send)

    async def _until_token_changes(self, scope: Scope, receive: Receive, send: Send) -> None:
        changed = self.state.token_changed()
        started = finished = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, finished
            kind = message["type"]
            if kind in ("http.response.start", "websocket.accept"):
                started = True
            elif (kind == "http.response.body" and not message.get("more_body", False)) or (
                kind in ("websocket.close", "websocket.http.response.body")
            ):
                finished = True
            await send(message)

        app_task = asyncio.ensure_future(self.app(scope, receive, tracking_send))
        watch = asyncio.ensure_future(changed.wait())
        try:
            await asyncio.wait({app_task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            app_task.cancel()
            raise
        finally:
            watch.cancel()
        if app_task.done():
            app_task.result()
            return
        app_task.cancel()
        await asyncio.wait({app_task}, timeout=5)
        if finished:
            return
        if scope["type"] == "http":
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await _refuse(scope, send, 401, "unauthorized", "the access token was replaced")
        else:
            await send({"type": "websocket.close", "code": 4401})


async def _refuse(scope: Scope, send: Send, status: int, error: str, message: str) -> None:
    body = json.dumps({"error": error, "message": message}, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
    elif "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 4000 + status})
