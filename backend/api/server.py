"""One port for both APIs: a request naming a sandbox (``E2b-Sandbox-Id``) goes to the
sandbox proxy, a path under ``/v1/`` to Wrenn's API (wrenn/), anything else to E2B's REST API.
So ``E2B_API_URL``, ``E2B_SANDBOX_URL`` and ``WRENN_BASE_URL`` may all be the same URL."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from . import DEFAULT_HOST, DEFAULT_PORT
from .capsules import Capsules
from .proxy import SANDBOX_ID_HEADER, SandboxProxy
from .rest import Api, error
from .wrenn.app import PREFIX as WRENN_PREFIX
from .wrenn.app import WrennApp
from .wrenn.ports import PortProxy, port_target

log = logging.getLogger("wrenn.api")

EXPIRE_INTERVAL_S = 1.0
SANDBOX_HEADER = SANDBOX_ID_HEADER.encode()


async def _not_found(request: Request, exc: Exception) -> Response:
    return error(404, f"no route {request.method} {request.url.path}")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return error(405, f"{request.method} is not allowed on {request.url.path}")


def is_signed_file_url(scope: Scope) -> bool:
    """`download_url` / `upload_url` of a secured sandbox: `/files?...&signature=...` with no
    sandbox header (E2B puts the sandbox in the host name; one URL here cannot)."""
    query: bytes = scope.get("query_string", b"")
    return scope.get("path") == "/files" and any(
        part.startswith(b"signature=") for part in query.split(b"&")
    )


class AgentApp:
    """The ASGI application: REST routes, the sandbox proxy, and the timeout reaper."""

    def __init__(self, capsules: Capsules, api_key: str) -> None:
        self.api = Api(capsules, api_key)
        self.proxy = SandboxProxy(capsules)
        self.wrenn = WrennApp(capsules, api_key)
        self.ports = PortProxy(capsules)
        self.rest: ASGIApp = Starlette(
            routes=self.api.routes(),
            exception_handlers={404: _not_found, 405: _method_not_allowed},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        reaper = asyncio.create_task(self._reap(), name="e2b-timeouts")
        await self.wrenn.start()
        try:
            yield
        finally:
            reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reaper
            await self.proxy.aclose()
            await self.wrenn.aclose()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(EXPIRE_INTERVAL_S)
            try:
                await self.api.expire()
            except Exception:
                log.exception("ending timed-out sandboxes failed")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if port_target(scope) is not None:
            # http://{port}-{capsule id}.{host}: a program's port in the capsule (Wrenn's
            # get_url); no API key, like Wrenn's own proxy: the capsule id names it.
            await self.ports(scope, receive, send)
            return
        if scope["type"] == "http" and any(
            name == SANDBOX_HEADER for name, _ in scope.get("headers", [])
        ):
            await self.proxy(scope, receive, send)
            return
        if scope["type"] in ("http", "websocket") and scope["path"].startswith(WRENN_PREFIX):
            await self.wrenn(scope, receive, send)
            return
        if scope["type"] == "http" and is_signed_file_url(scope):
            await self.proxy.signed(scope, receive, send)
            return
        await self.rest(scope, receive, send)


class ApiServer:
    """The agent API on uvicorn, run as a task of the caller's event loop (the CLI's
    ``serve``, or the dashboard next to its own work)."""

    def __init__(
        self, capsules: Capsules, api_key: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
    ) -> None:
        self.app = AgentApp(capsules, api_key)
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host=host,
                port=port,
                loop="asyncio",
                http="h11",
                lifespan="on",
                log_level="warning",
                access_log=False,
                server_header=False,
                timeout_graceful_shutdown=3,
            )
        )
        self._task: asyncio.Task[None] | None = None

        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        if self._socket is not None:
            return int(self._socket.getsockname()[1])
        return int(self.server.config.port)

    def _bind(self) -> socket.socket:
        config = self.server.config
        family, kind, proto, _, address = socket.getaddrinfo(
            config.host, config.port, type=socket.SOCK_STREAM
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self) -> None:
        """Listen (an OSError when the address is taken) and serve in the background."""
        # Bound here rather than by uvicorn, which answers a bind error with sys.exit().
        self._socket = self._bind()
        self._task = asyncio.create_task(
            self.server.serve(sockets=[self._socket]), name="wrenn-api"
        )
        while not self.server.started:
            if self._task.done():
                await self._task
                raise RuntimeError("the API server stopped while starting")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is not None:
            self.server.should_exit = True
            await self._task
            self._task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def wait(self) -> None:
        if self._task is not None:
            await self._task
