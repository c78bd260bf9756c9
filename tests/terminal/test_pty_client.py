"""PtyClient (the transport, no Textual) against a real envd."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from backend.pty_client import (
    Attached,
    ConnectionState,
    Exited,
    Output,
    PtyClient,
    PtyEvent,
    RequestFailed,
    StateChanged,
)
from tests.terminal.conftest import SHELL, PausableProxy, new_capsule_id


class Recorder:
    """Consumes a client's events in the background, as the pane does."""

    def __init__(self, client: PtyClient) -> None:
        self.client = client
        self.events: list[PtyEvent] = []
        self.output = ""
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.client.events():
            self.events.append(event)
            if isinstance(event, Output):
                self.output += event.data

    def of(self, kind: type) -> list[PtyEvent]:
        return [event for event in self.events if isinstance(event, kind)]

    def states(self) -> list[ConnectionState]:
        return [event.state for event in self.events if isinstance(event, StateChanged)]

    async def until(self, predicate: object, timeout: float = 10, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not met; events: {self.events[-8:]}")
            await asyncio.sleep(0.02)

    async def text(self, text: str, timeout: float = 10) -> None:
        await self.until(lambda: text in self.output, timeout, f"{text!r} in output")


@asynccontextmanager
async def recorded(url: str, **options: object) -> AsyncIterator[Recorder]:
    options = {**SHELL, "tag": f"tui-{new_capsule_id()}", **options}
    client = PtyClient(url, None, retry_interval=0.1, max_retry_interval=0.3, **options)  # type: ignore[arg-type]
    recorder = Recorder(client)
    try:
        yield recorder
    finally:
        await client.close()
        await asyncio.wait_for(recorder.task, 5)


async def test_starts_the_session_then_streams_output_and_exit(envd_url: str) -> None:
    async with recorded(envd_url, cols=91, rows=17) as rec:
        await rec.until(lambda: rec.of(Attached), what="attached")
        attached = rec.of(Attached)[0]
        assert isinstance(attached, Attached) and attached.new_session and attached.alive
        assert rec.client.state == ConnectionState.CONNECTED
        await rec.client.send_input("stty size; exit 3\r")
        await rec.until(lambda: rec.of(Exited), what="exit")
        assert "17 91" in rec.output
        exited = rec.of(Exited)[0]
        assert isinstance(exited, Exited) and exited.exit_code == 3


async def test_a_second_client_with_the_same_tag_reattaches_and_gets_a_replay(
    envd_url: str,
) -> None:
    async with recorded(envd_url) as first:
        await first.until(lambda: first.of(Attached), what="attached")
        await first.client.send_input("export X=same-shell; echo marker-$((40+2))\r")
        await first.text("marker-42")
        async with recorded(envd_url, tag=first.client.tag) as second:
            await second.text("marker-42")
            attached = second.of(Attached)[0]
            assert isinstance(attached, Attached) and not attached.new_session
            assert attached.pid == first.client.pid
            replays = [e for e in second.of(Output) if isinstance(e, Output) and e.replay]
            assert replays and "marker-42" in replays[0].data
            await second.client.send_input("echo X=$X\r")
            await second.text("X=same-shell")


async def test_a_dropped_socket_is_reattached_by_tag(envd_url: str) -> None:
    async with recorded(envd_url) as rec:
        await rec.until(lambda: rec.of(Attached), what="attached")
        await rec.client.send_input("export X=kept; echo set-$((1+1))\r")
        await rec.text("set-2")
        rec.client.drop_connection()
        await rec.until(lambda: len(rec.of(Attached)) == 2, what="reattached")
        assert ConnectionState.RECONNECTING in rec.states()
        await rec.client.send_input("echo X=$X\r")
        await rec.text("X=kept")


async def test_paused_capsule_waits_then_reattaches_to_the_same_shell(
    envd_url: str, proxy: PausableProxy
) -> None:
    async with recorded(proxy.url) as rec:
        await rec.until(lambda: rec.of(Attached), what="attached")
        pid = rec.client.pid
        await rec.client.send_input("export X=survives-pause; echo set-$((1+1))\r")
        await rec.text("set-2")
        await proxy.pause()
        await rec.until(
            lambda: rec.client.state == ConnectionState.DISCONNECTED, what="disconnected"
        )
        rec.client.set_paused(True)
        assert rec.client.state == ConnectionState.PAUSED
        # Typed while paused: delivered after the reattach, like a stalled ssh session.
        await rec.client.send_input("echo typed-while-paused\r")
        await asyncio.sleep(0.5)
        assert rec.client.state == ConnectionState.PAUSED
        await proxy.resume()
        rec.client.set_paused(False)
        await rec.until(lambda: len(rec.of(Attached)) == 2, timeout=5, what="reattached")
        assert rec.client.connected and rec.client.pid == pid
        # "$X-end" is not expanded in the echoed command line: this waits for the shell's answer
        await rec.client.send_input("echo X=$X-end\r")
        await rec.text("X=survives-pause-end")
        assert re.search(r"(?<!echo )typed-while-paused", rec.output), repr(rec.output)


async def test_an_unreachable_envd_is_reported_and_retried_until_it_answers(
    envd_url: str, proxy: PausableProxy
) -> None:
    await proxy.pause()
    async with recorded(proxy.url) as rec:
        await rec.until(
            lambda: rec.client.state == ConnectionState.DISCONNECTED, what="disconnected"
        )
        await proxy.resume()
        await rec.until(lambda: rec.of(Attached), timeout=5, what="attached after resume")


async def test_refused_start_is_an_error_not_a_retry_loop(envd_url: str) -> None:
    async with recorded(envd_url, cmd="/no/such/shell", args=None) as rec:
        await rec.until(lambda: rec.client.state == ConnectionState.CLOSED, what="closed")
        errors = rec.of(RequestFailed)
        assert errors and isinstance(errors[0], RequestFailed)
        assert errors[0].code == "command_not_found"
