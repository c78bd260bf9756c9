"""The sampler's HTTP/1.1 client: keep-alive reuse, and every way a peer can misbehave costs
one PollError within the timeout and never a stuck or broken connection afterwards."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from backend.sampler import Target, envd_poll
from backend.sampler.envd_poll import MAX_BODY, EnvdPoller, PollError

from .conftest import HostEnvd

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]

METRICS = json.dumps({"mem_used": 1, "mem_total": 2, "cpu_used_pct": 3.5}).encode()


def answer(body: bytes = METRICS, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
    head += f"content-length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class Server:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer, self.connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def target(self, token: str | None = None, capsule_id: str = "cl-a") -> Target:
        return Target(capsule_id, f"http://127.0.0.1:{self.port}", token, None)


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    server.port = listener.sockets[0].getsockname()[1]
    try:
        yield server
    finally:
        listener.close()


async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while await read_request(reader) is not None:
        writer.write(answer())
        await writer.drain()


async def test_one_connection_serves_every_poll() -> None:
    async with serving(keep_alive) as server:
        poller = EnvdPoller(1.0)
        for _ in range(5):
            assert (await poller.fetch(server.target()))["cpu_used_pct"] == 3.5
        assert server.connections == 1 and poller.connects == 1 and poller.requests == 5
        await poller.aclose()


async def test_the_token_is_sent_and_a_new_token_or_port_opens_a_new_connection() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while (request := await read_request(reader)) is not None:
            seen.append(request)
            writer.write(answer())

    async with serving(record) as server:
        poller = EnvdPoller(1.0)
        await poller.fetch(server.target("t1"))
        await poller.fetch(server.target("t2"))
        assert b"GET /metrics HTTP/1.1\r\n" in seen[0]
        assert b"x-access-token: t1\r\n" in seen[0].lower()
        assert b"x-access-token: t2\r\n" in seen[1].lower()
        assert server.connections == 2
        await poller.aclose()


async def test_a_connection_the_peer_closed_between_polls_is_replaced_without_an_error() -> None:
    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        # Answers as if keeping the connection, then drops it: a keep-alive expiry race.
        if await read_request(reader) is not None:
            writer.write(answer())
            await writer.drain()

    async with serving(one_per_connection) as server:
        poller = EnvdPoller(1.0)
        for _ in range(3):
            await poller.fetch(server.target())
            await asyncio.sleep(0.05)  # the close reaches us
        assert server.connections == 3
        await poller.aclose()


async def test_a_stale_connection_is_retried_once_on_a_fresh_one() -> None:
    async def close_unanswered_after_first(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int
    ) -> None:
        if await read_request(reader) is None:
            return
        writer.write(answer())
        await writer.drain()
        # The second request on this connection is read and dropped unanswered.
        await read_request(reader)

    async with serving(close_unanswered_after_first) as server:
        poller = EnvdPoller(1.0)
        await poller.fetch(server.target())
        assert (await poller.fetch(server.target()))["mem_used"] == 1
        assert server.connections == 2
        await poller.aclose()


async def test_connection_close_and_idle_expiry_open_a_new_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        while await read_request(reader) is not None:
            writer.write(answer(extra="connection: close\r\n") if n == 1 else answer())
            await writer.drain()

    async with serving(closing) as server:
        poller = EnvdPoller(1.0)
        await poller.fetch(server.target())
        await poller.fetch(server.target())
        assert server.connections == 2
        monkeypatch.setattr(envd_poll, "KEEPALIVE_S", 0.05)
        await asyncio.sleep(0.1)
        await poller.fetch(server.target())
        assert server.connections == 3
        await poller.aclose()


async def expect_error(handler: Handler, message: str, timeout: float = 0.3) -> Server:
    """The poll fails with `message` within the timeout, and the next poll of a healthy peer
    on the same endpoint works."""
    async with serving(handler) as server:
        poller = EnvdPoller(timeout)
        started = time.monotonic()
        with pytest.raises(PollError) as caught:
            await poller.fetch(server.target())
        assert time.monotonic() - started < timeout + 0.2
        assert message in str(caught.value)
        server.handler = keep_alive
        assert (await poller.fetch(server.target()))["mem_used"] == 1
        await poller.aclose()
        return server


def first_bad(bad: bytes) -> Handler:
    """Answers the first request with `bad`, every later one (same connection) properly."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        first = True
        while await read_request(reader) is not None:
            writer.write(bad if first else answer())
            first = False

    return handler


async def test_non_200_is_reported_with_its_status() -> None:
    server = await expect_error(
        first_bad(answer(b'{"message":"x"}', "401 Unauthorized")), "HTTP 401"
    )
    assert server.connections == 1  # the answer was complete: the connection is kept


async def test_not_json_and_not_an_object_are_reported() -> None:
    server = await expect_error(first_bad(answer(b"<html>")), "answer is not JSON")
    assert server.connections == 1
    await expect_error(first_bad(answer(b"[1, 2]")), "answer is not a JSON object")


async def test_not_http_is_reported() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        await reader.read()

    await expect_error(garbage, "bad HTTP answer")


async def test_an_endless_body_is_cut_off_at_the_size_limit() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"x" * 65536
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()

    await expect_error(endless, f"larger than {MAX_BODY >> 10} KiB", timeout=2.0)


async def test_a_trickling_peer_is_cut_off_at_the_timeout() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
        while True:
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(0.05)

    await expect_error(trickle, "no answer within 0.3 s")


async def test_a_peer_closing_mid_answer_is_reported() -> None:
    async def half(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
        await read_request(reader)
        writer.write(answer()[:-5])
        await writer.drain()

    await expect_error(half, "bad HTTP answer")


async def test_a_refused_connection_is_reported(silent_port: int) -> None:
    async with serving(keep_alive) as server:
        port = server.port
    poller = EnvdPoller(0.3)
    with pytest.raises(PollError, match="cannot connect"):
        await poller.fetch(Target("cl-a", f"http://127.0.0.1:{port}", None, None))
    with pytest.raises(PollError, match=r"no answer within 0\.3 s"):
        await poller.fetch(Target("cl-b", f"http://127.0.0.1:{silent_port}", None, None))
    with pytest.raises(PollError, match="not an http:// URL"):
        await poller.fetch(Target("cl-c", "https://127.0.0.1:1", None, None))
    await poller.aclose()


async def test_real_envd_keeps_one_connection_per_capsule(
    start_envds: Callable[[int], list[HostEnvd]],
) -> None:
    envds = start_envds(2)
    poller = EnvdPoller(1.0)
    for _ in range(3):
        bodies = await asyncio.gather(
            *(poller.fetch(e.target(f"cl-{i}")) for i, e in enumerate(envds))
        )
        assert all(body["mem_total"] > 0 for body in bodies)
    assert poller.connects == 2 and poller.requests == 6
    await poller.drop("cl-0")
    assert len(poller) == 1
    await poller.aclose()
