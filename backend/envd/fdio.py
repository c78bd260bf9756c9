"""Non-blocking file descriptors driven by the event loop: no thread per pipe or terminal.

Used for child pipes and PTY masters alike. Child exit is watched through a pidfd rather
than asyncio's subprocess machinery, whose ``wait()`` also waits for every pipe to close and
so hangs while a daemonised grandchild keeps stdout open.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger("envd.fdio")

READ_CHUNK = 64 * 1024
# One wake-up reads at most this much; bounds how far a burst can overshoot the high water.
READ_BURST = 64 * 1024


class FlowControl(Protocol):
    @property
    def throttled(self) -> bool: ...

    def on_writable(self, callback: Callable[[], None]) -> None: ...


class FdReader:
    def __init__(self, fd: int, sink: Callable[[bytes], None], flow: FlowControl) -> None:
        self.fd = fd
        self.sink = sink
        self.flow = flow
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self.finished = self._loop.create_future()
        os.set_blocking(fd, False)

    def start(self) -> None:
        if not self._reading and not self.finished.done():
            self._loop.add_reader(self.fd, self._on_readable)
            self._reading = True

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def _read_burst(self, limit: int) -> tuple[bytes, bool]:
        """Read what is available now, up to ``limit``; the flag tells whether EOF was hit."""
        parts: list[bytes] = []
        total = 0
        while total < limit:
            try:
                data = os.read(self.fd, min(READ_CHUNK, limit - total))
            except BlockingIOError:
                return b"".join(parts), False
            except OSError as exc:
                # EIO is how a PTY master reports that every slave side has been closed.
                if exc.errno != errno.EIO:
                    log.warning("read from fd %d failed: %s", self.fd, exc)
                return b"".join(parts), True
            if not data:
                return b"".join(parts), True
            parts.append(data)
            total += len(data)
        return b"".join(parts), False

    def _on_readable(self) -> None:
        data, eof = self._read_burst(READ_BURST)
        if data:
            self.sink(data)
        if eof:
            self.finish()
        elif self.flow.throttled:
            self._stop_reading()
            self.flow.on_writable(self.start)

    def drain(self, limit: int = 1024 * 1024) -> None:
        """Take what the kernel still buffers, regardless of flow control (the child is gone)."""
        if self.finished.done():
            return
        data, eof = self._read_burst(limit)
        if data:
            self.sink(data)
        if eof:
            self.finish()

    def finish(self) -> None:
        self._stop_reading()
        if not self.finished.done():
            self.finished.set_result(None)


class BufferFull(Exception):
    pass


class FdWriter:
    """Buffered writes to a non-blocking fd; ``close_fd`` closes it once everything is written."""

    def __init__(self, fd: int, limit: int = 1024 * 1024, owns_fd: bool = True) -> None:
        self.fd = fd
        self.limit = limit
        self.owns_fd = owns_fd
        self._loop = asyncio.get_running_loop()
        self._pending = bytearray()
        self._waiting = False
        self._close_requested = False
        self.closed = False
        self.broken = False
        os.set_blocking(fd, False)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def write(self, data: bytes) -> None:
        if self.closed or self._close_requested:
            raise BrokenPipeError(errno.EPIPE, "input is closed")
        if self.broken:
            raise BrokenPipeError(errno.EPIPE, "the reader has gone away")
        if self._pending:
            if len(self._pending) + len(data) > self.limit:
                raise BufferFull(f"more than {self.limit} bytes of input are waiting")
            self._pending += data
            return
        written = self._write_some(data)
        if written < len(data):
            self._pending += data[written:]
            self._wait_writable()

    def _write_some(self, data: bytes | bytearray) -> int:
        try:
            return os.write(self.fd, data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            self.broken = True
            self._pending.clear()
            if exc.errno not in (errno.EPIPE, errno.EIO):
                log.warning("write to fd %d failed: %s", self.fd, exc)
            raise BrokenPipeError(errno.EPIPE, "the reader has gone away") from None

    def _wait_writable(self) -> None:
        if not self._waiting:
            self._loop.add_writer(self.fd, self._on_writable)
            self._waiting = True

    def _on_writable(self) -> None:
        try:
            written = self._write_some(self._pending)
        except BrokenPipeError:
            written = 0
        del self._pending[:written]
        if not self._pending:
            self._loop.remove_writer(self.fd)
            self._waiting = False
            if self._close_requested:
                self._close_now()

    def close_fd(self) -> None:
        """Close after the pending bytes are written (so the child sees them, then EOF)."""
        if self.closed:
            return
        self._close_requested = True
        if not self._pending or self.broken:
            self._close_now()

    def abort(self) -> None:
        self._pending.clear()
        self._close_now()

    def _close_now(self) -> None:
        if self._waiting:
            self._loop.remove_writer(self.fd)
            self._waiting = False
        if not self.closed:
            self.closed = True
            if self.owns_fd:
                with contextlib.suppress(OSError):
                    os.close(self.fd)


def _returncode(result: os.waitid_result) -> int:
    # Same convention as subprocess: negative signal number when killed by a signal.
    if result.si_code in (os.CLD_KILLED, os.CLD_DUMPED):
        return -result.si_status
    return result.si_status


async def wait_exit(pid: int) -> int:
    """Reap child ``pid`` once it exits and return its subprocess-style returncode."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return await _poll_exit(pid)
    try:
        exited = loop.create_future()

        def on_exit() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, on_exit)
        try:
            await exited
        finally:
            loop.remove_reader(pidfd)
        # The pidfd polled readable, so the child has exited and this returns at once.
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)  # noqa: ASYNC222
        assert result is not None
        return _returncode(result)
    finally:
        os.close(pidfd)


async def _poll_exit(pid: int) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG never blocks)
        if done:
            return os.waitstatus_to_exitcode(status)
        await asyncio.sleep(0.05)
