"""Full-screen attach: the real terminal, raw, bridged to a capsule's terminal session.

The escape hatch for programs the pane's emulator cannot render well: the user's own terminal
does the rendering. Blocking by design, for use inside ``App.suspend()``::

    with app.suspend():
        result = attach_fullscreen(capsule.envd_url, capsule.access_token, session_tag(capsule.id))

It returns when the user presses the detach key (ctrl+], as in telnet), when the program
exits, or when the connection drops (the capsule was paused). A pane attached to the same
session should let go of it first (``TerminalPane.attach_fullscreen`` does both): while the
event loop is blocked here, a pane that stops reading would make envd hold the program's
output back for everyone.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import termios
import threading
import tty
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.sync.client import ClientConnection, connect

from backend.envd import protocol as wire

DETACH_BYTE = b"\x1d"  # ctrl+]
SIZE_POLL_S = 0.5
# Modes a program may leave switched on in the real terminal when we detach from it midway:
# application cursor keys, bracketed paste, mouse reporting, hidden cursor, alternate screen.
RESTORE_TERMINAL = (
    "\x1b[0m\x1b[?1l\x1b[?2004l\x1b[?1000l\x1b[?1002l\x1b[?1003l\x1b[?1006l\x1b[?25h\x1b[?1049l"
)


@dataclass(frozen=True)
class AttachResult:
    reason: Literal["detached", "exited", "disconnected"]
    exit_code: int | None = None
    signal: str | None = None
    message: str = ""


class AttachError(Exception):
    """The session could not be reached or started; the message says what to do."""


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[written:]


def _terminal_size(fd: int) -> tuple[int, int]:
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return 80, 24
    return max(1, size.columns), max(1, size.lines)


def _send(ws: ClientConnection, message: Mapping[str, Any]) -> None:
    ws.send(json.dumps(message, ensure_ascii=False))


def _handshake(ws: ClientConnection, message: Mapping[str, Any]) -> dict[str, Any]:
    _send(ws, message)
    while True:
        reply: dict[str, Any] = json.loads(ws.recv(timeout=10))
        if reply.get("type") in (*wire.PTY_ATTACH_REPLIES, wire.PTY_ERROR):
            return reply


def _connect(envd_url: str, token: str | None) -> ClientConnection:
    try:
        return connect(
            wire.pty_ws_url(envd_url),
            additional_headers=wire.auth_headers(token),
            open_timeout=10,
            max_size=wire.MAX_PTY_MESSAGE,
            compression=None,
            proxy=None,
        )
    except InvalidStatus as exc:
        raise AttachError(
            f"envd at {envd_url} refused the connection (HTTP {exc.response.status_code})"
        ) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise AttachError(
            f"cannot reach the capsule's envd at {envd_url} ({exc}): is the capsule running?"
        ) from None


def _start(ws: ClientConnection, start: Mapping[str, Any]) -> dict[str, Any]:
    reply = _handshake(ws, start)
    if reply["type"] == wire.PTY_ERROR:
        raise AttachError(f"envd could not start a shell: {reply.get('message')}")
    return reply


@contextlib.contextmanager
def _session_socket(
    envd_url: str, token: str | None, tag: str, start: Mapping[str, Any]
) -> Iterator[ClientConnection]:
    """A socket attached to ``tag``: the running session, or a new one under that tag."""
    try:
        with _connect(envd_url, token) as ws:
            reply = _handshake(ws, wire.pty_connect(tag))
            if reply["type"] == wire.PTY_ERROR and reply.get("error") != wire.PTY_UNKNOWN_SESSION:
                raise AttachError(f"envd refused to attach {tag!r}: {reply.get('message')}")
            exited = reply["type"] == wire.PTY_CONNECTED and not reply.get("alive", True)
            if not exited:
                if reply["type"] == wire.PTY_ERROR:
                    _start(ws, start)
                yield ws
                return
        # The shell exited earlier: a fresh one, on a fresh socket (that one was still
        # draining the old session's last output).
        with _connect(envd_url, token) as ws:
            _start(ws, start)
            yield ws
    except (ConnectionClosed, TimeoutError) as exc:
        raise AttachError(f"the connection to envd at {envd_url} failed: {exc}") from None


@contextlib.contextmanager
def _raw_mode(fd: int) -> Iterator[None]:
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _on_window_change(wake_fd: int) -> Iterator[None]:
    """Wake the loop on SIGWINCH; only possible on the main thread, elsewhere the size is
    polled instead."""

    def handler(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(wake_fd, b"w")

    try:
        previous = signal.signal(signal.SIGWINCH, handler)
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGWINCH, previous)


class _OutputPump(threading.Thread):
    """Copies the session's output to the real terminal and notes how the session ends."""

    def __init__(self, ws: ClientConnection, out_fd: int, wake_fd: int) -> None:
        super().__init__(name="attach-output", daemon=True)
        self.ws = ws
        self.out_fd = out_fd
        self.wake_fd = wake_fd
        self.result: AttachResult | None = None

    def run(self) -> None:
        try:
            for raw in self.ws:
                message = json.loads(raw)
                kind = message.get("type")
                if kind == wire.PTY_OUTPUT:
                    _write_all(self.out_fd, str(message.get("data", "")).encode("utf-8"))
                elif kind == wire.PTY_EXIT:
                    self.result = AttachResult(
                        "exited", message.get("exit_code"), message.get("signal")
                    )
                    break
                elif kind == wire.PTY_PING:
                    _send(self.ws, {"type": wire.PTY_PONG})
        except (ConnectionClosed, OSError):
            pass
        finally:
            if self.result is None:
                self.result = AttachResult("disconnected", message="the connection was lost")
            with contextlib.suppress(OSError):
                os.write(self.wake_fd, b"x")


def attach_fullscreen(
    envd_url: str,
    token: str | None,
    tag: str,
    *,
    stdin_fd: int | None = None,
    stdout_fd: int | None = None,
    cmd: str | None = None,
    args: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    detach_byte: bytes = DETACH_BYTE,
) -> AttachResult:
    """Bridge the real terminal to session ``tag`` (started if there is none) until detach,
    exit or disconnect. Raises :class:`AttachError` when the session cannot be reached."""
    in_fd = sys.stdin.fileno() if stdin_fd is None else stdin_fd
    out_fd = sys.stdout.fileno() if stdout_fd is None else stdout_fd
    cols, rows = _terminal_size(out_fd)
    start = wire.pty_start(
        cols,
        rows,
        tag=tag,
        cmd=cmd,
        args=list(args) if cmd is not None and args is not None else None,
        env=dict(env) if env is not None else None,
    )
    with _session_socket(envd_url, token, tag, start) as ws:
        return _bridge(ws, tag, in_fd, out_fd, (cols, rows), detach_byte)


def _bridge(
    ws: ClientConnection,
    tag: str,
    in_fd: int,
    out_fd: int,
    size: tuple[int, int],
    detach_byte: bytes,
) -> AttachResult:
    cols, rows = size
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    pump = _OutputPump(ws, out_fd, wake_w)
    result: AttachResult | None = None
    try:
        _send(ws, wire.pty_resize(cols, rows))
        banner = f"\x1b[H\x1b[2J[attached to {tag}: ctrl+] returns to the dashboard]\r\n"
        _write_all(out_fd, banner.encode())
        with _raw_mode(in_fd), _on_window_change(wake_w):
            pump.start()
            while pump.result is None:
                ready, _, _ = select.select([in_fd, wake_r], [], [], SIZE_POLL_S)
                if wake_r in ready:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 4096)
                if _terminal_size(out_fd) != (cols, rows):
                    cols, rows = _terminal_size(out_fd)
                    _send(ws, wire.pty_resize(cols, rows))
                if in_fd not in ready:
                    continue
                data = os.read(in_fd, 65536)
                if not data:
                    result = AttachResult("detached", message="end of input")
                    break
                before, found, _ = data.partition(detach_byte)
                if before:
                    _send(ws, wire.pty_input(before))
                if found:
                    result = AttachResult("detached")
                    break
    except (ConnectionClosed, OSError) as exc:
        result = AttachResult("disconnected", message=str(exc))
    finally:
        ws.close()
        if pump.is_alive():
            pump.join(timeout=2)
        os.close(wake_r)
        os.close(wake_w)
        with contextlib.suppress(OSError):
            _write_all(out_fd, RESTORE_TERMINAL.encode())
    return result or pump.result or AttachResult("disconnected")
