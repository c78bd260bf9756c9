"""The /pty WebSocket: JSON text messages in both directions, mapped onto PtyManager.

One connection drives at most one session at a time; closing the connection only detaches,
the session keeps running until it exits or is killed.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from .buffers import LogReader
from .errors import ApiError, bad_request, conflict
from .pty_sessions import PtyManager, PtySession, PtyStartRequest
from .validation import Fields, parse_signal

log = logging.getLogger("envd.pty")

# Output is coalesced into messages of up to this many bytes when the client falls behind.
OUTPUT_BATCH = 128 * 1024


def skip_partial_char(data: bytes) -> bytes:
    """Drop UTF-8 continuation bytes at the start of a replay that began mid-character."""
    start = 0
    while start < min(3, len(data)) and 0x80 <= data[start] <= 0xBF:
        start += 1
    return data[start:]


class PtyConnection:
    def __init__(self, ws: WebSocket, manager: PtyManager, ping_interval: float) -> None:
        self.ws = ws
        self.manager = manager
        self.ping_interval = ping_interval
        self.session: PtySession | None = None
        self.reader: LogReader[bytes] | None = None
        self.pump: asyncio.Task[None] | None = None
        self.open = True
        self._send_lock = asyncio.Lock()
        self._handlers: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = {
            "start": self._on_start,
            "connect": self._on_connect,
            "input": self._on_input,
            "resize": self._on_resize,
            "kill": self._on_kill,
            "detach": self._on_detach,
            "ping": self._on_ping,
            "pong": self._on_pong,
        }

    async def run(self) -> None:
        await self.ws.accept()
        pinger = asyncio.create_task(self._ping_loop())
        try:
            while self.open:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    await self.send_error(
                        bad_request("binary frames are not supported; send JSON text")
                    )
                    continue
                await self._dispatch(text)
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            pass
        finally:
            self.open = False
            pinger.cancel()
            await self._detach()

    async def send(self, message: dict[str, Any]) -> None:
        if not self.open:
            return
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        try:
            async with self._send_lock:
                await self.ws.send_text(text)
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            self.open = False

    async def send_error(self, error: ApiError, request: str | None = None) -> None:
        message: dict[str, Any] = {"type": "error", "error": error.code, "message": error.message}
        if request is not None:
            message["request"] = request
        await self.send(message)

    async def _dispatch(self, text: str) -> None:
        try:
            obj = json.loads(text)
        except (ValueError, RecursionError) as exc:
            await self.send_error(bad_request(f"message is not JSON: {exc}", "bad_json"))
            return
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            await self.send_error(
                bad_request("message must be a JSON object with a string 'type'", "invalid_message")
            )
            return
        kind = obj["type"]
        handler = self._handlers.get(kind)
        if handler is None:
            await self.send_error(
                bad_request(f"unknown message type {kind!r}", "unknown_type"), kind
            )
            return
        try:
            await handler(obj)
        except ApiError as exc:
            await self.send_error(exc, kind)

    def _require_session(self) -> PtySession:
        if self.session is None:
            raise conflict("no session attached; send 'start' or 'connect' first", "not_attached")
        return self.session

    def _ensure_detached(self) -> None:
        if self.session is not None:
            raise conflict(
                f"already attached to session {self.session.tag!r}; send 'detach' first",
                "already_attached",
            )

    def _attach(self, session: PtySession) -> None:
        self._ensure_detached()
        self.session = session
        self.reader = session.attach(replay=True)

    async def _detach(self) -> None:
        pump, self.pump = self.pump, None
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        if self.reader is not None:
            self.reader.close()
        self.reader = None
        self.session = None

    def _start_pump(self) -> None:
        assert self.session is not None and self.reader is not None
        self.pump = asyncio.create_task(self._pump_output(self.session, self.reader))

    async def _pump_output(self, session: PtySession, reader: LogReader[bytes]) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            while self.open and (batch := await reader.next(OUTPUT_BATCH)) is not None:
                data = b"".join(batch.items)
                if batch.resync:
                    decoder.reset()
                    data = skip_partial_char(data)
                text = decoder.decode(data)
                if text:
                    await self.send({"type": "output", "data": text})
            if not self.open:
                return
            tail = decoder.decode(b"", final=True)
            if tail:
                await self.send({"type": "output", "data": tail})
            await session.done.wait()
            await self.send(
                {
                    "type": "exit",
                    "tag": session.tag,
                    "exit_code": session.exit_code,
                    "signal": session.signal,
                }
            )
        finally:
            reader.close()
            if self.reader is reader:
                self.reader = None
                self.session = None
                self.pump = None

    async def _ping_loop(self) -> None:
        while self.open:
            await asyncio.sleep(self.ping_interval)
            await self.send({"type": "ping"})

    # -- message handlers -------------------------------------------------------------------

    async def _on_start(self, msg: dict[str, Any]) -> None:
        self._ensure_detached()
        request = PtyStartRequest.parse(msg)
        session = self.manager.start(request)
        self._attach(session)
        await self.send(
            {
                "type": "started",
                "tag": session.tag,
                "pid": session.pid,
                "cols": session.cols,
                "rows": session.rows,
            }
        )
        self._start_pump()

    async def _on_connect(self, msg: dict[str, Any]) -> None:
        tag = Fields(msg, "message").req_str("tag")
        session = self.manager.get(tag)
        self._attach(session)
        await self.send(
            {
                "type": "connected",
                "tag": session.tag,
                "pid": session.pid,
                "cols": session.cols,
                "rows": session.rows,
                "alive": session.alive,
            }
        )
        self._start_pump()

    async def _on_input(self, msg: dict[str, Any]) -> None:
        f = Fields(msg, "message")
        text = f.opt_str("data")
        raw = f.opt_b64("b64")
        if (text is None) == (raw is None):
            raise bad_request("input needs exactly one of 'data' (text) or 'b64' (base64 bytes)")
        self._require_session().write(text.encode() if text is not None else raw or b"")

    async def _on_resize(self, msg: dict[str, Any]) -> None:
        f = Fields(msg, "message")
        cols, rows = f.opt_int("cols"), f.opt_int("rows")
        if cols is None or rows is None:
            raise bad_request("resize needs integer 'cols' and 'rows'", "invalid_size")
        self._require_session().resize(cols, rows)

    async def _on_kill(self, msg: dict[str, Any]) -> None:
        sig = parse_signal(Fields(msg, "message").raw("signal", "SIGKILL"))
        self._require_session().kill(sig)

    async def _on_detach(self, msg: dict[str, Any]) -> None:
        session = self._require_session()
        await self._detach()
        await self.send({"type": "detached", "tag": session.tag})

    async def _on_ping(self, msg: dict[str, Any]) -> None:
        await self.send({"type": "pong"})

    async def _on_pong(self, msg: dict[str, Any]) -> None:
        return None
