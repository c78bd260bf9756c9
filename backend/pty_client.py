"""A client for envd's terminal WebSocket (``/pty``; the protocol is in backend/envd/__init__.py).

One :class:`PtyClient` drives one terminal session, named by its tag, and keeps it across
dropped connections: when the socket goes away (the capsule was paused, its VM snapshotted and
stopped) it reattaches by tag with backoff until the capsule answers again, and envd replays the
recent output so the caller can redraw. Everything the caller needs to know arrives through one
async iterator, :meth:`PtyClient.events`, in order::

    client = PtyClient(capsule.envd_url, capsule.access_token, tag="tui-cl-123", cols=120, rows=40)
    async for event in client.events():      # attaches (or starts the shell) and reconnects
        match event:
            case Attached():   ...            # a (re)attach: reset the screen, a replay follows
            case Output(data): ...            # terminal output, UTF-8 text
            case Exited():     ...            # the program ended; the socket stays usable
            case StateChanged(state): ...     # connected / reconnecting / disconnected / paused
            case RequestFailed():   ...            # envd refused a request
    await client.send_input("ls\\r")           # any time, from any task; never waits for output

Output is handed over with backpressure: while the caller has not consumed about
``OUTPUT_BACKLOG`` characters, the socket is not read, so envd makes the terminal's program
wait instead of piling its output up in memory. Input goes out at once on its own path.

This module is part of the backend: it knows nothing about screens or widgets.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from backend.envd import protocol as wire

log = logging.getLogger("wrenn.pty")

OUTPUT_BACKLOG = 128 * 1024
"""Characters of output received but not yet consumed before reading the socket pauses."""
INPUT_BACKLOG = 64 * 1024
"""Characters of input kept while disconnected, sent after the reattach."""
RECEIVE_QUEUE = 2
"""Frames the socket reads ahead. Everything buffered must be drawn before the screen shows
what followed a ctrl+c, so buffers stay just big enough to keep a flood flowing."""
RECEIVE_BUFFER = 128 * 1024
"""The TCP receive buffer, for the same reason."""


class ConnectionState(enum.StrEnum):
    CONNECTING = "connecting"
    """The first connection is being made."""
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    """The socket dropped; reattaching right away."""
    DISCONNECTED = "disconnected"
    """envd does not answer (most often: the capsule is paused); retrying."""
    PAUSED = "paused"
    """The caller said the capsule is paused; retrying slowly until it says otherwise."""
    CLOSED = "closed"
    """Closed by the caller, the session is gone, or retrying gave up."""


@dataclass(frozen=True)
class Attached:
    """The client is attached to a session; on a reattach the recent output follows."""

    tag: str
    pid: int
    cols: int
    rows: int
    alive: bool
    new_session: bool
    """True when the session was started now, False when an existing one was reattached."""


@dataclass(frozen=True)
class Output:
    data: str
    replay: bool = False
    """The first output after a reattach: earlier output replayed from envd's ring."""


@dataclass(frozen=True)
class Exited:
    tag: str
    exit_code: int | None
    signal: str | None


@dataclass(frozen=True)
class StateChanged:
    state: ConnectionState
    reason: str = ""


@dataclass(frozen=True)
class RequestFailed:
    """envd refused or failed one request of the session (an event on the stream; the
    session itself may go on)."""

    code: str
    message: str
    request: str | None = None


PtyEvent = Attached | Output | Exited | StateChanged | RequestFailed


class PtyClientError(Exception):
    """envd refused to start or attach the session (the ``code`` is envd's error code)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class _Transient(Exception):
    """A failure worth retrying: the capsule is paused, resuming, or the network blinked."""


class PtyClient:
    """One terminal session on one capsule's envd, kept attached across dropped connections.

    ``tag`` names the session: with a tag, :meth:`events` reattaches to that session when it
    is alive and otherwise starts a new one under the same tag, so a pane opened again finds
    the same shell. ``cmd``/``args``/``env``/``cwd`` only matter when a session is started
    (no ``cmd``: the user's login shell).
    """

    def __init__(
        self,
        envd_url: str,
        token: str | None = None,
        *,
        tag: str | None = None,
        cmd: str | None = None,
        args: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        cols: int = 80,
        rows: int = 24,
        retry_interval: float = 0.5,
        max_retry_interval: float = 1.0,
        paused_retry_interval: float = 2.0,
        reconnect_timeout: float = 3600.0,
        open_timeout: float = 5.0,
        ping_interval: float = 10.0,
    ) -> None:
        self.envd_url = envd_url
        self.ws_url = wire.pty_ws_url(envd_url)
        self.token = token
        self.tag = tag
        self.cmd = cmd
        self.args = list(args) if args is not None else None
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.cols = cols
        self.rows = rows
        self.pid: int | None = None
        self.retry_interval = retry_interval
        self.max_retry_interval = max_retry_interval
        self.paused_retry_interval = paused_retry_interval
        self.reconnect_timeout = reconnect_timeout
        self.open_timeout = open_timeout
        self.ping_interval = ping_interval

        self._state = ConnectionState.CONNECTING
        self._ws: ClientConnection | None = None
        self._session_alive = False
        self._paused = False
        self._closed = False
        self._replay_next = False
        self._supervisor: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._events: deque[PtyEvent] = deque()
        self._event_ready = asyncio.Event()
        self._backlog_chars = 0
        self._backlog_room = asyncio.Event()
        self._backlog_room.set()
        self._input_backlog: list[dict[str, str]] = []
        self._input_backlog_chars = 0

    # -- state ------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        return self._state

    @property
    def connected(self) -> bool:
        return self._state == ConnectionState.CONNECTED and self._ws is not None

    def _set_state(self, state: ConnectionState, reason: str = "") -> None:
        if self._paused and state in (ConnectionState.DISCONNECTED, ConnectionState.RECONNECTING):
            state = ConnectionState.PAUSED
        if state == self._state:
            return
        self._state = state
        log.info("pty %s: %s %s", self.tag, state, reason)
        self._push(StateChanged(state, reason))

    def set_paused(self, paused: bool) -> None:
        """The caller knows the capsule is paused (or resumed): say so, and retry at once on
        resume instead of waiting for the next attempt."""
        self._paused = paused
        if paused:
            if self._state != ConnectionState.CLOSED:
                self._set_state(ConnectionState.PAUSED, "the capsule is paused")
        else:
            if self._state == ConnectionState.PAUSED:
                connected = self._ws is not None
                resumed = ConnectionState.CONNECTED if connected else ConnectionState.RECONNECTING
                self._set_state(resumed, "the capsule was resumed")
            self._wake.set()

    # -- events -----------------------------------------------------------------------------

    def _push(self, event: PtyEvent) -> None:
        self._events.append(event)
        self._event_ready.set()

    async def _push_output(self, event: Output) -> None:
        # Waiting here stops reading the socket: the backpressure reaches the program in the
        # capsule instead of growing this process's memory.
        while self._backlog_chars >= OUTPUT_BACKLOG and not self._closed:
            self._backlog_room.clear()
            await self._backlog_room.wait()
        self._backlog_chars += len(event.data)
        self._push(event)

    async def events(self) -> AsyncIterator[PtyEvent]:
        """Attach (or start) the session if that has not happened yet, then yield everything
        that happens to it until :meth:`close`. Only one consumer at a time."""
        self._ensure_supervisor()
        while True:
            while self._events:
                event = self._events.popleft()
                if isinstance(event, Output):
                    self._backlog_chars -= len(event.data)
                    if self._backlog_chars < OUTPUT_BACKLOG:
                        self._backlog_room.set()
                yield event
            if self._closed or (self._supervisor is not None and self._supervisor.done()):
                return
            self._event_ready.clear()
            await self._event_ready.wait()

    def _ensure_supervisor(self) -> None:
        if self._supervisor is None and not self._closed:
            self._supervisor = asyncio.create_task(self._supervise(), name=f"pty-{self.tag}")

    # -- sending ----------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> bool:
        ws = self._ws
        if ws is None:
            return False
        try:
            await ws.send(json.dumps(message, ensure_ascii=False, separators=(",", ":")))
        except (ConnectionClosed, OSError):
            return False
        return True

    async def send_input(self, data: bytes | str) -> None:
        """Type into the terminal. While disconnected, up to ``INPUT_BACKLOG`` characters are
        kept and sent after the reattach (as an ssh connection that stalls would)."""
        if not data:
            return
        message = wire.pty_input(data)
        if await self._send(message):
            return
        size = len(next(iter(message.values())))
        if self._input_backlog_chars + size <= INPUT_BACKLOG:
            self._input_backlog.append(message)
            self._input_backlog_chars += size

    async def resize(self, cols: int, rows: int) -> None:
        """Set the terminal's size (1..1000 each); remembered for a reattach or a restart."""
        cols, rows = max(1, min(1000, cols)), max(1, min(1000, rows))
        if (cols, rows) == (self.cols, self.rows):
            return
        self.cols, self.rows = cols, rows
        if self._session_alive:
            await self._send(wire.pty_resize(cols, rows))

    async def kill(self, signal: str | int | None = None) -> None:
        """Signal the session's process group (default SIGKILL); an ``Exited`` event follows."""
        await self._send(wire.pty_kill(signal))

    async def detach(self) -> None:
        """Stop receiving output and stop reattaching; the session keeps running in envd."""
        self._session_alive = False
        await self._send({"type": wire.PTY_DETACH})

    async def close(self) -> None:
        """Close the socket (envd only detaches: the shell keeps running) and end
        :meth:`events`."""
        self._closed = True
        self._wake.set()
        self._backlog_room.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not asyncio.current_task():
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        if self._state != ConnectionState.CLOSED:
            self._state = ConnectionState.CLOSED
            self._push(StateChanged(ConnectionState.CLOSED, "closed"))

    def drop_connection(self) -> None:
        """Cut the socket without a closing handshake, as a paused VM does; the client then
        reattaches by itself. For tests, and for a caller that knows the socket is dead."""
        ws = self._ws
        if ws is not None:
            ws.transport.abort()

    # -- attaching --------------------------------------------------------------------------

    async def start(self) -> Attached:
        """Start a new session (under ``tag`` when set) on a new socket."""
        return await self._attach(self._start_message())

    async def connect(self, tag: str | None = None) -> Attached:
        """Reattach to the running session ``tag`` (default: this client's tag)."""
        tag = tag or self.tag
        if not tag:
            raise ValueError("connect needs a tag")
        self.tag = tag
        return await self._attach(wire.pty_connect(tag))

    async def restart(self) -> Attached:
        """Start a new session under the same tag after the previous one exited."""
        return await self.start()

    def _start_message(self) -> dict[str, Any]:
        return wire.pty_start(
            self.cols, self.rows, tag=self.tag, cmd=self.cmd, args=self.args, env=self.env,
            cwd=self.cwd,
        )  # fmt: skip

    async def _tcp_socket(self) -> socket.socket | None:
        """A connected socket with a small receive buffer, for plain ``ws://`` URLs."""
        parts = urlsplit(self.ws_url)
        if parts.scheme != "ws" or parts.hostname is None:
            return None
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(parts.hostname, parts.port or 80, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            # Left to autotune, the kernel buffers megabytes of a flood on loopback, all of
            # which must be drawn before the screen shows what followed a ctrl+c.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
            async with asyncio.timeout(self.open_timeout):
                await loop.sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _open_socket(self) -> ClientConnection:
        headers = wire.auth_headers(self.token)
        try:
            sock = await self._tcp_socket()
            return await connect(
                self.ws_url,
                sock=sock,
                additional_headers=headers,
                open_timeout=self.open_timeout,
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_interval,
                close_timeout=1,
                max_size=wire.MAX_PTY_MESSAGE,
                max_queue=RECEIVE_QUEUE,
                # Output is mostly fresh text on a local link: compressing it costs more CPU
                # than it saves. And a capsule's port is never behind a proxy.
                compression=None,
                proxy=None,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status in (401, 403):
                raise PtyClientError(
                    "unauthorized",
                    f"envd at {self.envd_url} refused the access token (HTTP {status})",
                ) from None
            raise _Transient(f"HTTP {status}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            raise _Transient(str(exc) or type(exc).__name__) from None

    async def _handshake(self, ws: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
        try:
            await ws.send(json.dumps(message))
            async with asyncio.timeout(self.open_timeout):
                while True:
                    reply: dict[str, Any] = json.loads(await ws.recv())
                    kind = reply.get("type")
                    if kind in wire.PTY_ATTACH_REPLIES:
                        return reply
                    if kind == wire.PTY_ERROR:
                        raise PtyClientError(str(reply.get("error")), str(reply.get("message")))
                    if kind == wire.PTY_PING:
                        await ws.send(json.dumps({"type": wire.PTY_PONG}))
        except (ConnectionClosed, OSError, TimeoutError) as exc:
            raise _Transient(str(exc) or type(exc).__name__) from None

    async def _attach(self, message: dict[str, Any]) -> Attached:
        ws = await self._open_socket()
        try:
            reply = await self._handshake(ws, message)
        except BaseException:
            await ws.close()
            raise
        return await self._adopt(ws, reply)

    async def _adopt(self, ws: ClientConnection, reply: dict[str, Any]) -> Attached:
        old, self._ws = self._ws, ws
        new_session = reply["type"] == wire.PTY_STARTED
        attached = Attached(
            tag=str(reply["tag"]),
            pid=int(reply["pid"]),
            cols=int(reply["cols"]),
            rows=int(reply["rows"]),
            alive=bool(reply.get("alive", True)),
            new_session=new_session,
        )
        self.tag, self.pid = attached.tag, attached.pid
        self._session_alive = attached.alive
        self._replay_next = not new_session
        # No await before Attached is queued: the reader may already be on the new socket,
        # and output queued before Attached would be wiped by the reset it triggers.
        self._set_state(ConnectionState.CONNECTED)
        self._push(attached)
        if old is not None and old is not ws:
            with contextlib.suppress(Exception):
                await old.close()
        if attached.alive and (attached.cols, attached.rows) != (self.cols, self.rows):
            # The pane may have changed size while the socket was down.
            await self._send(wire.pty_resize(self.cols, self.rows))
        backlog, self._input_backlog, self._input_backlog_chars = self._input_backlog, [], 0
        for pending in backlog:
            await self._send(pending)
        self._ensure_supervisor()
        self._wake.set()
        return attached

    async def _establish(self, *, first: bool) -> bool:
        """Attach (the first time: start the session if there is none to reattach), retrying
        transient failures until ``reconnect_timeout``. False when it gave up for good."""
        deadline = time.monotonic() + self.reconnect_timeout
        delay = self.retry_interval
        while not self._closed:
            try:
                await self._attach_or_start(first=first)
                return True
            except PtyClientError as exc:
                self._push(RequestFailed(exc.code, exc.message))
                self._set_state(ConnectionState.CLOSED, exc.message)
                return False
            except _Transient as exc:
                reason = str(exc)
            if first and self._state == ConnectionState.CONNECTING:
                log.info("pty %s: envd not reachable yet: %s", self.tag, reason)
            self._set_state(ConnectionState.DISCONNECTED, reason)
            if time.monotonic() >= deadline:
                self._set_state(
                    ConnectionState.CLOSED,
                    f"gave up reattaching after {self.reconnect_timeout:.0f} s: {reason}",
                )
                return False
            interval = self.paused_retry_interval if self._paused else delay
            delay = min(delay * 2, self.max_retry_interval)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()
        return False

    async def _attach_or_start(self, *, first: bool) -> None:
        if not self.tag:
            await self.start()
            return
        ws = await self._open_socket()
        try:
            try:
                reply = await self._handshake(ws, wire.pty_connect(self.tag))
            except PtyClientError as exc:
                if exc.code != wire.PTY_UNKNOWN_SESSION:
                    raise
                if not first:
                    # envd no longer knows the session: the capsule was rebooted, not resumed.
                    self._push(RequestFailed(exc.code, f"{exc.message}; starting a new shell"))
                reply = await self._handshake(ws, self._start_message())
            else:
                if first and not reply.get("alive", True):
                    # A pane opened again after its shell exited gets a fresh shell.
                    await ws.close()
                    await self.start()
                    return
        except BaseException:
            await ws.close()
            raise
        await self._adopt(ws, reply)

    # -- reading ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        try:
            await self._run()
        except Exception as exc:
            log.exception("pty %s: the client failed", self.tag)
            self._push(RequestFailed("client_failed", f"the terminal connection failed: {exc}"))
            self._set_state(ConnectionState.CLOSED, str(exc))
        finally:
            self._event_ready.set()

    async def _run(self) -> None:
        if self._ws is None and not await self._establish(first=True):
            return
        while not self._closed:
            ws = self._ws
            if ws is None:
                if not self._session_alive:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._set_state(ConnectionState.RECONNECTING, "connection lost")
                if not await self._establish(first=False):
                    return
                continue
            await self._read(ws)
            if self._ws is ws:
                self._ws = None
                if not self._session_alive and not self._closed:
                    self._set_state(ConnectionState.CLOSED, "connection closed")

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                if self._ws is not ws:
                    return  # replaced by a restart: what is left belongs to the old session
                if isinstance(raw, bytes):
                    continue
                await self._handle(ws, json.loads(raw))
        except (ConnectionClosed, OSError):
            return

    async def _handle(self, ws: ClientConnection, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == wire.PTY_OUTPUT:
            replay, self._replay_next = self._replay_next, False
            await self._push_output(Output(str(message.get("data", "")), replay))
        elif kind == wire.PTY_EXIT:
            self._session_alive = False
            self._replay_next = False
            self._push(
                Exited(str(message.get("tag")), message.get("exit_code"), message.get("signal"))
            )
        elif kind == wire.PTY_ERROR:
            self._push(
                RequestFailed(
                    str(message.get("error")), str(message.get("message")), message.get("request")
                )
            )
        elif kind == wire.PTY_PING:
            with contextlib.suppress(ConnectionClosed, OSError):
                await ws.send(json.dumps({"type": wire.PTY_PONG}))
        elif kind == wire.PTY_DETACHED:
            self._session_alive = False
