"""The Wrenn API as one ASGI app (served under ``/v1`` by backend/api/server.py): the route
groups, the API key check, Wrenn's error bodies, and the reservations recorder."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import httpx
from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from backend.api.capsules import Capsules
from backend.api.keys import given_key, key_matches
from backend.api.rest import HttpError
from backend.capsules.errors import CapsuleError, CapsuleNotFound, IllegalTransition

from .errors import CODES, WrennError, error_body, error_response
from .guest import Guest
from .lifecycle import Lifecycle
from .observe import RECORD_INTERVAL_S, Observe
from .sockets import Sockets

log = logging.getLogger("wrenn.api.wrenn")

PREFIX = "/v1/"
NOT_PROVIDED = {
    "auth": "accounts and sign-in",
    "me": "accounts",
    "api-keys": "API key management (the one key is `wrenn-tui api-key`)",
    "users": "accounts",
    "teams": "teams",
    "hosts": "hosts (wrenn-tui is one host)",
    "channels": "notification channels",
}

Handler = Callable[[Request], Awaitable[Response]]
SocketHandler = Callable[[WebSocket], Awaitable[None]]


def _from_exception(exc: Exception) -> WrennError | None:
    if isinstance(exc, WrennError):
        return exc
    if isinstance(exc, HttpError):
        return WrennError(exc.status, exc.message)
    if isinstance(exc, CapsuleNotFound):
        return WrennError(404, str(exc))
    if isinstance(exc, IllegalTransition):
        return WrennError(409, str(exc), "invalid_state")
    if isinstance(exc, CapsuleError):
        return WrennError(502, str(exc))
    return None


class WrennApp:
    def __init__(self, capsules: Capsules, api_key: str) -> None:
        self.api_key = api_key
        self.envd = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            # Capsules are on loopback: a proxy from the environment must never be used.
            trust_env=False,
        )
        self.lifecycle = Lifecycle(capsules, self.envd)
        self.guest = Guest(capsules, self.envd)
        self.sockets = Sockets(capsules, self.envd)
        self.observe = Observe(capsules, self.envd)
        self._recorder: asyncio.Task[None] | None = None
        routes: list[BaseRoute] = []
        for route in [
            *self.observe.routes(),
            *self.lifecycle.routes(),
            *self.guest.routes(),
        ]:
            routes.append(
                Route(route.path, self.guarded(route.endpoint), methods=list(route.methods or []))
            )
        for socket in self.sockets.routes():
            routes.append(WebSocketRoute(socket.path, self.guarded_socket(socket.endpoint)))
        self.app = Starlette(
            routes=routes,
            exception_handlers={404: self._not_found, 405: self._method_not_allowed},
        )

    # -- plumbing ------------------------------------------------------------------------------

    def authorized(self, scope: Scope) -> bool:
        return key_matches(self.api_key, given_key(HTTPConnection(scope)))

    def guarded(self, handler: Callable[..., Awaitable[Response]]) -> Handler:
        async def endpoint(request: Request) -> Response:
            if not self.authorized(request.scope):
                return error_response(
                    WrennError(401, "invalid or missing X-API-Key: see `wrenn-tui api-key`")
                )
            try:
                return await handler(request)
            except Exception as exc:
                known = _from_exception(exc)
                if known is None:
                    log.exception("%s %s failed", request.method, request.url.path)
                    known = WrennError(500, f"internal error: {exc!r}", "internal_error")
                return error_response(known)

        return endpoint

    def guarded_socket(self, handler: Callable[..., Awaitable[None]]) -> SocketHandler:
        async def endpoint(ws: WebSocket) -> None:
            if not self.authorized(ws.scope):
                await self._deny(ws, WrennError(401, "invalid or missing X-API-Key"))
                return
            try:
                await handler(ws)
            except Exception as exc:
                known = _from_exception(exc)
                if known is None:
                    log.exception("WebSocket %s failed", ws.url.path)
                    known = WrennError(500, f"internal error: {exc!r}", "internal_error")
                await self._deny(ws, known)

        return endpoint

    async def _deny(self, ws: WebSocket, error: WrennError) -> None:
        """Refuse the handshake with Wrenn's error body (or, once accepted, an error message
        and a close)."""
        with contextlib.suppress(Exception):
            if ws.client_state.name == "CONNECTING":
                await ws.send_denial_response(error_response(error))
            else:
                await ws.send_json({"type": "error", "data": error.message, "fatal": True})
                await ws.close()

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        area = request.url.path.removeprefix(PREFIX).split("/", 1)[0]
        if area in NOT_PROVIDED:
            message = (
                f"wrenn-tui does not provide Wrenn's {NOT_PROVIDED[area]} routes "
                f"({request.url.path}): it serves capsules, snapshots, metrics and events"
            )
        else:
            message = f"no route {request.method} {request.url.path}"
        return JSONResponse(error_body(404, "not_found", message), status_code=404)

    async def _method_not_allowed(self, request: Request, exc: Exception) -> Response:
        return JSONResponse(
            error_body(
                405,
                CODES.get(405, "invalid_request"),
                f"{request.method} is not allowed on {request.url.path}",
            ),
            status_code=405,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

    # -- lifetime ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._recorder = asyncio.create_task(self._record(), name="wrenn-reservations")

    async def _record(self) -> None:
        while True:
            try:
                await self.observe.record()
            except Exception:
                log.exception("recording reservations failed")
            await asyncio.sleep(RECORD_INTERVAL_S)

    async def aclose(self) -> None:
        if self._recorder is not None:
            self._recorder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recorder
        await self.lifecycle.aclose()
        await self.envd.aclose()
