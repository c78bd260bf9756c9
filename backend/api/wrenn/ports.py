"""``http://{port}-{capsule id}.{host}/...`` (the SDK's ``get_url(port)``): plain HTTP to a
program listening on that port inside the capsule.

Each request rides one envd ``/tcp`` tunnel (backend/envd/tunnel.py) to 127.0.0.1:port in the
guest, so it works with no capsule network at all, and reaches nothing but the capsule's own
loopback (never the host, another capsule, or envd's port). The request is written and the
response read with h11, streamed both ways; ``Connection: close`` ends each exchange.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import h11
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from backend.api.capsules import Capsules
from backend.capsules.errors import CapsuleNotFound
from backend.capsules.models import State
from backend.envd.protocol import ENVD_PORT, auth_headers

from .errors import error_body

PORT_HOST = re.compile(r"^(\d{1,5})-(cl-[0-9a-z]{12})(?:\.|:|$)")
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
    }
)
CLOSE_REFUSED = 4404


def port_target(scope: Scope) -> tuple[int, str] | None:
    """(port, capsule id) when the request's Host names a capsule's port."""
    if scope["type"] != "http":
        return None
    host = next((v for k, v in scope.get("headers", []) if k == b"host"), b"")
    found = PORT_HOST.match(host.decode("latin-1").lower())
    if found is None:
        return None
    return int(found.group(1)), found.group(2)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(status, code, message), status_code=status)


class PortProxy:
    def __init__(self, capsules: Capsules) -> None:
        self.capsules = capsules

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        target = port_target(scope)
        assert target is not None
        response = await self.forward(Request(scope, receive), *target)
        await response(scope, receive, send)

    async def forward(self, request: Request, port: int, capsule_id: str) -> Response:
        if not 1 <= port <= 65535 or port == ENVD_PORT:
            return _error(400, "invalid_request", f"port {port} cannot be proxied")
        try:
            capsule = self.capsules.get(capsule_id)
        except CapsuleNotFound:
            return _error(404, "not_found", f"capsule {capsule_id} not found")
        if capsule.state != State.RUNNING:
            return _error(409, "invalid_state", f"capsule {capsule_id} is {capsule.state}")
        try:
            tunnel = await connect(
                capsule.envd_url.replace("http://", "ws://") + f"/tcp?port={port}",
                additional_headers=auth_headers(capsule.access_token),
                max_size=None,
                compression=None,
                proxy=None,
                open_timeout=10,
            )
        except (OSError, WebSocketException, TimeoutError) as exc:
            return _error(502, "agent_error", f"envd in {capsule_id} did not answer: {exc!r}")
        self.capsules.touch(capsule_id)
        conn = h11.Connection(our_role=h11.CLIENT)
        try:
            await self._send_request(request, tunnel, conn, port)
            head = await _next_event(tunnel, conn)
        except _PortClosed as exc:
            await tunnel.close()
            return _error(502, "agent_error", str(exc))
        except (h11.ProtocolError, ClientDisconnect, ConnectionClosed) as exc:
            await tunnel.close()
            return _error(502, "agent_error", f"port {port} in {capsule_id}: {exc!r}")
        if not isinstance(head, h11.Response):
            await tunnel.close()
            return _error(502, "agent_error", f"port {port} in {capsule_id} sent no response")
        headers = {
            k.decode("latin-1"): v.decode("latin-1")
            for k, v in head.headers
            if k.lower() not in HOP_BY_HOP
        }

        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    event = await _next_event(tunnel, conn)
                    if isinstance(event, h11.Data):
                        yield bytes(event.data)
                    else:
                        return
            except (h11.ProtocolError, _PortClosed, ConnectionClosed):
                return  # the status is sent: ending the body early is all that is left
            finally:
                await tunnel.close()

        return StreamingResponse(body(), status_code=head.status_code, headers=headers)

    async def _send_request(
        self, request: Request, tunnel: ClientConnection, conn: h11.Connection, port: int
    ) -> None:
        headers = [(k, v) for k, v in request.headers.raw if k.lower() not in HOP_BY_HOP]
        headers.append((b"host", f"localhost:{port}".encode()))
        headers.append((b"connection", b"close"))
        has_length = any(k.lower() == b"content-length" for k, _ in headers)
        chunked = not has_length and "transfer-encoding" in request.headers
        if chunked:
            headers.append((b"transfer-encoding", b"chunked"))
        target = request.scope.get("raw_path") or request.url.path.encode()
        if request.scope.get("query_string"):
            target += b"?" + request.scope["query_string"]
        head = h11.Request(method=request.method, target=target, headers=headers)
        await tunnel.send(conn.send(head) or b"")
        if has_length or chunked:
            async for chunk in request.stream():
                if chunk:
                    await tunnel.send(conn.send(h11.Data(data=chunk)) or b"")
        await tunnel.send(conn.send(h11.EndOfMessage()) or b"")


class _PortClosed(Exception):
    pass


async def _next_event(tunnel: ClientConnection, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await tunnel.recv()
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == CLOSE_REFUSED:
                raise _PortClosed(exc.rcvd.reason) from None
            conn.receive_data(b"")
            continue
        conn.receive_data(data if isinstance(data, bytes) else data.encode())
