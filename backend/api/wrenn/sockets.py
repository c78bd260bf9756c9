"""Wrenn's WebSockets, bridged to envd:

- ``/v1/capsules/{id}/exec/stream``: the client sends ``{"type": "start", "cmd", "args"?}``;
  envd's ``POST /exec?stream=1`` NDJSON events come back as ``{"type": "start", "pid"}``,
  ``{"type": "stdout"|"stderr", "data"}``, ``{"type": "exit", "exit_code"}`` (or
  ``{"type": "error", "data"}``).
- ``/v1/capsules/{id}/processes/{selector}/stream``: the same events of a background process
  (PID or tag), from envd's ``/processes/{ref}/events`` (recent output replayed first).
- ``/v1/capsules/{id}/pty``: Wrenn's terminal protocol over envd's ``/pty`` sessions, the
  ones the dashboard's shell pane attaches to by tag. In: ``start`` / ``connect`` / ``resize``
  / ``kill`` / ``pong`` as JSON text, keystrokes as binary frames. Out: ``started`` (pid, tag),
  output as binary frames, ``exit`` (exit_code), ``error`` (data, fatal).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from backend.capsules.models import Capsule
from backend.envd import protocol as wire

from .base import Base, envd_failure

log = logging.getLogger("wrenn.api.wrenn")

Json = dict[str, Any]


def stream_event(event: Json) -> Json | None:
    """envd's NDJSON process event -> Wrenn's stream event (None: nothing to tell)."""
    kind = event.get("type")
    if kind == "start":
        return {"type": "start", "pid": event.get("pid", 0)}
    if kind in ("stdout", "stderr"):
        return {"type": kind, "data": event.get("data", "")}
    if kind == "exit":
        return {"type": "exit", "exit_code": event.get("exit_code", -1)}
    return None


class Sockets(Base):
    async def _error(self, ws: WebSocket, message: str) -> None:
        with contextlib.suppress(Exception):
            await ws.send_json({"type": "error", "data": message})
            await ws.close()

    async def _events(
        self, ws: WebSocket, capsule: Capsule, method: str, path: str, body: Json | None
    ) -> None:
        """Relay envd's NDJSON events until the exit event or the client leaves."""
        request = self.envd.build_request(
            method,
            capsule.envd_url + path,
            json=body,
            headers=wire.auth_headers(capsule.access_token),
            timeout=httpx.Timeout(30.0, read=None),
        )
        try:
            upstream = await self.envd.send(request, stream=True)
        except httpx.HTTPError as exc:
            await self._error(ws, f"envd in capsule {capsule.id} did not answer: {exc!r}")
            return
        try:
            if upstream.status_code >= 400:
                await upstream.aread()
                await self._error(ws, envd_failure(upstream).message)
                return
            async for line in upstream.aiter_lines():
                if not line.strip():
                    continue
                event = stream_event(json.loads(line))
                if event is not None:
                    await ws.send_json(event)
            await ws.close()
        except httpx.HTTPError as exc:
            await self._error(ws, f"the stream from envd ended early: {exc!r}")
        finally:
            await upstream.aclose()

    async def _until_gone(self, ws: WebSocket, work: Awaitable[None]) -> None:
        """Run `work` until it ends or the client goes away (then it is cancelled)."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(_wait_disconnect(ws))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, gone):
                t.cancel()
            await asyncio.gather(task, gone, return_exceptions=True)

    async def exec_stream(self, ws: WebSocket) -> None:
        capsule = self.running(ws.path_params["id"])
        await ws.accept()
        try:
            start = json.loads(await ws.receive_text())
        except (ValueError, KeyError, WebSocketDisconnect):
            await self._error(ws, "the first message must be {'type': 'start', 'cmd': ...}")
            return
        cmd = start.get("cmd") if isinstance(start, dict) else None
        args = start.get("args") if isinstance(start, dict) else None
        if (
            start.get("type") != "start"
            or not isinstance(cmd, str)
            or not cmd
            or not (
                args is None or (isinstance(args, list) and all(isinstance(a, str) for a in args))
            )
        ):
            await self._error(ws, "expected {'type': 'start', 'cmd': str, 'args'?: [str]}")
            return
        body = {"argv": [cmd, *(args or [])], "timeout": 0}
        await self._until_gone(
            ws, self._events(ws, capsule, "POST", "/exec?stream=1&encoding=utf8", body)
        )

    async def process_stream(self, ws: WebSocket) -> None:
        capsule = self.running(ws.path_params["id"])
        selector = ws.path_params["selector"]
        await ws.accept()
        path = f"/processes/{selector}/events?encoding=utf8&replay=1"
        await self._until_gone(ws, self._events(ws, capsule, "GET", path, None))

    # -- terminals ---------------------------------------------------------------------------

    async def pty(self, ws: WebSocket) -> None:
        capsule = self.running(ws.path_params["id"])
        await ws.accept()
        try:
            first = await _client_message(ws)
        except WebSocketDisconnect:
            return
        opening = _opening(first)
        if isinstance(opening, str):
            await ws.send_json({"type": "error", "data": opening, "fatal": True})
            await ws.close()
            return
        try:
            envd = await connect(
                wire.pty_ws_url(capsule.envd_url),
                additional_headers=wire.auth_headers(capsule.access_token),
                max_size=wire.MAX_PTY_MESSAGE,
                compression=None,
                proxy=None,
                open_timeout=10,
            )
        except (OSError, WebSocketException, TimeoutError) as exc:
            await ws.send_json(
                {"type": "error", "data": f"envd's terminal did not answer: {exc!r}", "fatal": True}
            )
            await ws.close()
            return
        async with envd:
            await envd.send(json.dumps(opening))
            to_envd = asyncio.ensure_future(_client_to_envd(ws, envd))
            to_client = asyncio.ensure_future(_envd_to_client(envd, ws))
            try:
                await asyncio.wait({to_envd, to_client}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (to_envd, to_client):
                    task.cancel()
                await asyncio.gather(to_envd, to_client, return_exceptions=True)
        with contextlib.suppress(Exception):
            await ws.close()

    def routes(self) -> list[WebSocketRoute]:
        base = "/v1/capsules/{id}"
        return [
            WebSocketRoute(f"{base}/exec/stream", self.exec_stream),
            WebSocketRoute(f"{base}/processes/{{selector}}/stream", self.process_stream),
            WebSocketRoute(f"{base}/pty", self.pty),
        ]


async def _wait_disconnect(ws: WebSocket) -> None:
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return


async def _client_message(ws: WebSocket) -> Json | bytes:
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    if message.get("bytes") is not None:
        return bytes(message["bytes"])
    try:
        data = json.loads(message.get("text") or "")
    except ValueError:
        return {"type": "invalid", "data": message.get("text")}
    return data if isinstance(data, dict) else {"type": "invalid", "data": data}


def _opening(message: Json | bytes) -> Json | str:
    """The envd message that opens a session (start or connect), or what is wrong."""
    if isinstance(message, bytes):
        return "the first message must be a 'start' or 'connect' JSON text frame"
    kind = message.get("type")
    if kind == "connect":
        tag = message.get("tag")
        if not isinstance(tag, str) or not tag:
            return "connect needs a 'tag'"
        return wire.pty_connect(tag)
    if kind == "start":
        return _start(message)
    return f"the first message must be 'start' or 'connect', not {kind!r}"


def _start(message: Json) -> Json | str:
    cols, rows = message.get("cols", 80), message.get("rows", 24)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (cols, rows)):
        return "cols and rows must be integers"
    cmd, args = message.get("cmd"), message.get("args")
    envs, cwd = message.get("envs"), message.get("cwd")
    if cmd is not None and not isinstance(cmd, str):
        return "cmd must be a string"
    if not _strings(args):
        return "args must be a list of strings"
    if envs is not None and not (
        isinstance(envs, dict) and all(isinstance(v, str) for v in envs.values())
    ):
        return "envs must be an object of strings"
    if cwd is not None and not isinstance(cwd, str):
        return "cwd must be a string"
    if cmd is not None and args is None:
        args = []
    return wire.pty_start(cols, rows, cmd=cmd, args=args, env=envs, cwd=cwd)


async def _client_to_envd(ws: WebSocket, envd: ClientConnection) -> None:
    send: Callable[[Json], Awaitable[None]] = lambda m: envd.send(json.dumps(m))  # noqa: E731
    with contextlib.suppress(WebSocketDisconnect):
        while True:
            message = await _client_message(ws)
            if isinstance(message, bytes):
                await send(wire.pty_input(message))
                continue
            kind = message.get("type")
            if kind == "resize":
                await send(wire.pty_resize(message.get("cols", 0), message.get("rows", 0)))
            elif kind == "kill":
                await send(wire.pty_kill())
            elif kind in ("start", "connect"):
                opening = _opening(message)
                if isinstance(opening, str):
                    await ws.send_json({"type": "error", "data": opening, "fatal": False})
                else:
                    await send(opening)
            elif kind == "input" and isinstance(message.get("data"), str):
                await send(wire.pty_input(message["data"]))
            elif kind in ("pong", "ping"):
                continue
            else:
                await ws.send_json(
                    {"type": "error", "data": f"unknown message type {kind!r}", "fatal": False}
                )


async def _envd_to_client(envd: ClientConnection, ws: WebSocket) -> None:
    async for raw in envd:
        message = json.loads(raw)
        kind = message.get("type")
        if kind in wire.PTY_ATTACH_REPLIES:
            await ws.send_json(
                {"type": "started", "pid": message.get("pid"), "tag": message.get("tag")}
            )
        elif kind == wire.PTY_OUTPUT:
            await ws.send_bytes(str(message.get("data", "")).encode("utf-8"))
        elif kind == wire.PTY_EXIT:
            await ws.send_json({"type": "exit", "exit_code": message.get("exit_code", -1)})
        elif kind == wire.PTY_ERROR:
            fatal = message.get("request") in (wire.PTY_START, wire.PTY_CONNECT)
            await ws.send_json(
                {"type": "error", "data": message.get("message", ""), "fatal": fatal}
            )
        elif kind == wire.PTY_PING:
            await envd.send(json.dumps({"type": wire.PTY_PONG}))


def _strings(value: object) -> bool:
    """None, or a list of strings."""
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))
