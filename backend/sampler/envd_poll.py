"""GET /metrics from many envds at once, each over its own keep-alive HTTP/1.1 connection.

This is the sampler's hot path: every running capsule, every second. It speaks HTTP/1.1
through h11 (the protocol engine under httpcore and uvicorn, already pinned for envd) over a
plain asyncio stream per capsule, and not through httpx. Measured against the same 120 host
envds on this 2-core machine (2026-11-29), 15 ticks per client, one after the other:

- httpx (one AsyncHTTPTransport per capsule, requests pre-built): ~105 ms of CPU per tick,
  tick p50 ~165 ms. httpcore's pool, anyio cancel scopes and locks cost ~0.9 ms per request;
  an asyncio-native httpcore network backend still left ~75 ms (its locks are anyio's too);
- h11 over asyncio streams: ~29 ms of CPU per tick, tick p50 ~90 ms.

Only what envd's answers need is handled: a GET, a Content-Length or chunked body of at most
MAX_BODY bytes, keep-alive with a one-time retry when a reused connection turns out to have
been closed by the peer. A capsule's guest is not trusted, so a peer that answers slowly, too
much, or not HTTP at all only ever costs this capsule one PollError within `timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar
from urllib.parse import urlsplit

import h11

from backend.envd import protocol as wire
from backend.sampler.models import Target

log = logging.getLogger("wrenn.sampler")

_T = TypeVar("_T")

KEEPALIVE_S = 4.0
"""An idle connection older than this is not reused: uvicorn (envd) closes at 5 s, and a
request racing that close would fail."""

MAX_BODY = wire.MAX_SMALL_BODY
"""envd's /metrics is ~500 bytes; anything near this is not envd."""

READ_CHUNK = 1 << 16


class PollError(Exception):
    """envd gave no usable figures; the message is short enough for a status column."""


class _Stale(Exception):
    """A reused connection was closed by the peer before it answered: retry on a new one."""


class _TooLarge(Exception):
    pass


class _Connection:
    __slots__ = ("h11", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=16 << 10)
        self.idle_since = time.monotonic()

    def reusable(self) -> bool:
        return (
            self.h11.our_state is h11.DONE
            and self.h11.their_state is h11.DONE
            and not self.reader.at_eof()
            and not self.writer.is_closing()
            and time.monotonic() - self.idle_since < KEEPALIVE_S
        )

    def close(self) -> None:
        self.writer.close()


class _Endpoint:
    __slots__ = ("connection", "host", "port", "request", "target")

    def __init__(self, target: Target) -> None:
        url = urlsplit(target.envd_url)
        if url.scheme != "http" or url.hostname is None:
            raise PollError(f"not an http:// URL: {target.envd_url}")
        self.target = target
        self.host = url.hostname
        self.port = url.port or 80
        path = url.path.rstrip("/") + wire.METRICS_PATH
        headers = [("Host", url.netloc), ("Accept", "application/json")]
        if target.token:
            headers.append((wire.TOKEN_HEADER, target.token))
        self.request = h11.Request(method="GET", target=path, headers=headers)
        self.connection: _Connection | None = None

    def discard(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class EnvdPoller:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.requests = 0
        """Requests sent so far (for requests/s)."""
        self.connects = 0
        """Connections opened so far (a steady poll reuses one per capsule)."""
        self._endpoints: dict[str, _Endpoint] = {}

    def __len__(self) -> int:
        return len(self._endpoints)

    def _endpoint(self, target: Target) -> _Endpoint:
        endpoint = self._endpoints.get(target.capsule_id)
        if endpoint is not None:
            old = endpoint.target
            if old.envd_url == target.envd_url and old.token == target.token:
                return endpoint
            # A new port or token (a resume): the old connection leads nowhere useful.
            endpoint.discard()
        endpoint = _Endpoint(target)
        self._endpoints[target.capsule_id] = endpoint
        return endpoint

    async def fetch(self, target: Target) -> dict[str, Any]:
        """envd's /metrics body; raises PollError within `timeout` seconds whatever happens."""
        endpoint = self._endpoint(target)
        self.requests += 1
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    status, content = await self._exchange(endpoint)
                except _Stale:
                    endpoint.discard()
                    status, content = await self._exchange(endpoint)
        except PollError:
            endpoint.discard()
            raise
        except TimeoutError:
            endpoint.discard()
            raise PollError(f"no answer within {self.timeout:g} s") from None
        except (OSError, EOFError) as exc:
            endpoint.discard()
            raise PollError(f"connection lost: {_reason(exc)}") from None
        except h11.ProtocolError as exc:
            endpoint.discard()
            raise PollError(f"bad HTTP answer: {_reason(exc)}") from None
        except _TooLarge:
            endpoint.discard()
            raise PollError(f"answer larger than {MAX_BODY >> 10} KiB") from None
        if status != 200:
            raise PollError(f"HTTP {status}")
        try:
            body = json.loads(content)
        except ValueError:
            raise PollError("answer is not JSON") from None
        if not isinstance(body, dict):
            raise PollError("answer is not a JSON object")
        return body

    async def _connect(self, endpoint: _Endpoint) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
        except OSError as exc:
            raise PollError(f"cannot connect: {_reason(exc)}") from None
        self.connects += 1
        return _Connection(reader, writer)

    async def _exchange(self, endpoint: _Endpoint) -> tuple[int, bytes]:
        connection = endpoint.connection
        reused = connection is not None and connection.reusable()
        if connection is not None and not reused:
            endpoint.discard()
            connection = None
        if connection is None:
            connection = endpoint.connection = await self._connect(endpoint)
        else:
            connection.h11.start_next_cycle()
        conn = connection.h11
        status = 0
        body = bytearray()
        received = False
        try:
            connection.writer.write(conn.send(endpoint.request) + conn.send(h11.EndOfMessage()))
        except OSError:
            if reused:
                raise _Stale from None
            raise
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await connection.reader.read(READ_CHUNK)
                except OSError:
                    if reused and not received:
                        raise _Stale from None
                    raise
                if not data and reused and not received:
                    raise _Stale
                received = True
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    raise _TooLarge
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("closed before the answer was complete")
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            endpoint.discard()
        else:
            connection.idle_since = time.monotonic()
        return status, bytes(body)

    async def drop(self, capsule_id: str) -> None:
        endpoint = self._endpoints.pop(capsule_id, None)
        if endpoint is not None:
            await _close(endpoint)

    async def aclose(self) -> None:
        endpoints = list(self._endpoints.values())
        self._endpoints.clear()
        await asyncio.gather(*(_close(e) for e in endpoints), return_exceptions=True)


async def _close(endpoint: _Endpoint) -> None:
    connection, endpoint.connection = endpoint.connection, None
    if connection is not None:
        connection.close()
        with contextlib.suppress(OSError):
            await connection.writer.wait_closed()


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def figures(body: dict[str, Any]) -> tuple[int | None, int | None, int | None, float | None]:
    """(mem_used, mem_total, mem_cache, cpu_used_pct) from a /metrics body, None if absent."""

    def integer(key: str) -> int | None:
        value = body.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    total = integer("mem_total")
    used = integer("mem_used")
    if used is None:
        available = integer("mem_available")
        if total is not None and available is not None:
            used = max(0, total - available)
    cpu = body.get("cpu_used_pct")
    cpu_pct = float(cpu) if isinstance(cpu, int | float) and not isinstance(cpu, bool) else None
    return used, total, integer("mem_cache"), cpu_pct


class PollerThread:
    """An EnvdPoller on a thread and event loop of its own; the sampler's loop hands it a
    tick's targets and awaits the results.

    Sending a request to a local envd wakes that process, and on a busy host the kernel often
    runs it at once, pre-empting the sender inside send(): on the dashboard's loop that stalled
    keypresses by tens of milliseconds per tick with 120 capsules. On its own thread the stall
    costs only this thread (send() releases the GIL), and parsing the answers is interleaved
    with the UI at the interpreter's switch interval instead of in one burst.
    """

    def __init__(self, timeout: float) -> None:
        self._poller = EnvdPoller(timeout)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> int:
        return self._poller.requests

    def __len__(self) -> int:
        return len(self._poller)

    def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="wrenn-envd-poll", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread

    def _submit(self, coro: Coroutine[Any, Any, _T]) -> asyncio.Future[_T]:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the poller thread is not running")
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def fetch_many(self, targets: list[Target]) -> asyncio.Future[list[dict[str, Any] | str]]:
        """Start polling every target at once; the future gives, in order, each one's
        /metrics body or why there is none. Must be called from an event loop."""
        return self._submit(self._fetch_many(targets))

    async def _fetch_many(self, targets: list[Target]) -> list[dict[str, Any] | str]:
        return await asyncio.gather(*(self._fetch(t) for t in targets))

    async def _fetch(self, target: Target) -> dict[str, Any] | str:
        try:
            return await self._poller.fetch(target)
        except PollError as exc:
            return str(exc)
        except Exception as exc:
            log.exception("polling %s failed unexpectedly", target.capsule_id)
            return f"internal error: {type(exc).__name__}"

    async def drop(self, capsule_id: str) -> None:
        if self._loop is not None:
            await self._submit(self._poller.drop(capsule_id))

    async def aclose(self) -> None:
        """Close every connection and end the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            await self._submit(self._poller.aclose())
        finally:
            self._loop = self._thread = None
            loop.call_soon_threadsafe(loop.stop)
            await asyncio.to_thread(thread.join)
            loop.close()
