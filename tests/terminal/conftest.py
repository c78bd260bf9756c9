"""A real envd on the host, a tiny app around one TerminalPane, and a proxy that plays a
capsule being paused: its port refuses connections, then the same URL answers again and the
session is still there."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from textual.app import App, ComposeResult

from tests import hostenvd
from tests.hostenvd import HostEnvd, free_port
from tui.terminal import TerminalPane

SHELL = {"cmd": "/bin/bash", "args": ["--norc", "--noprofile"], "env": {"PS1": "wrenn$ "}}
_ids = itertools.count()


@pytest.fixture(scope="session")
def envd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("envd-terminal") / "root"
    envd = hostenvd.start(root, cls=HostEnvd)
    try:
        yield envd.url
    finally:
        envd.stop()
    assert "Traceback" not in envd.log(), envd.log()


def new_capsule_id() -> str:
    """A fresh id per test, so every test gets its own session tag."""
    return f"cl-test{next(_ids)}-{time.monotonic_ns() % 10**9}"


class PaneApp(App[None]):
    """Only a TerminalPane, plus a 1 s timer to prove the loop never stalls."""

    def __init__(self, envd_url: str, capsule_id: str | None = None, **pane: Any) -> None:
        super().__init__()
        self.envd_url = envd_url
        self.capsule_id = capsule_id or new_capsule_id()
        self.pane_options = {**SHELL, **pane}
        self.ticks: list[float] = []
        self.beats: list[float] = []
        self.messages: list[Any] = []

    def compose(self) -> ComposeResult:
        yield TerminalPane(self.capsule_id, self.envd_url, None, **self.pane_options)

    def on_mount(self) -> None:
        self.set_interval(1.0, lambda: self.ticks.append(time.monotonic()))
        self.set_interval(0.05, lambda: self.beats.append(time.monotonic()), name="heartbeat")
        self.query_one(TerminalPane).focus()

    def longest_stall(self, since: float) -> float:
        """The longest gap between 50 ms heartbeats after ``since``: how long the loop froze."""
        beats = [since, *(beat for beat in self.beats if beat >= since), time.monotonic()]
        return max(later - earlier for earlier, later in itertools.pairwise(beats))

    @property
    def pane(self) -> TerminalPane:
        return self.query_one(TerminalPane)

    def on_terminal_pane_detached(self, message: TerminalPane.Detached) -> None:
        self.messages.append(message)

    def on_terminal_pane_exited(self, message: TerminalPane.Exited) -> None:
        self.messages.append(message)

    def on_terminal_pane_title_changed(self, message: TerminalPane.TitleChanged) -> None:
        self.messages.append(message)


def screen_text(pane: TerminalPane) -> str:
    return "\n".join(line.rstrip() for line in pane.emulator.display)


def all_text(pane: TerminalPane) -> str:
    return "\n".join([*pane.emulator.history_text(), screen_text(pane)])


async def wait_for(
    predicate: Callable[[], object], timeout: float = 10, what: str = "condition"
) -> float:
    """Seconds it took; fails with ``what`` after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"{what} not met within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def wait_for_text(pane: TerminalPane, text: str, timeout: float = 10) -> float:
    try:
        return await wait_for(lambda: text in screen_text(pane), timeout, repr(text))
    except AssertionError:
        raise AssertionError(f"{text!r} never appeared; screen:\n{screen_text(pane)}") from None


async def type_line(pane: TerminalPane, line: str) -> None:
    await pane.send(line + "\r")


class PausableProxy:
    """Forwards a local port to envd; ``pause()`` drops every connection and refuses new ones
    (the port is closed), ``resume()`` listens on the same port again."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def resume(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def pause(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for writer in list(self.writers):
            transport = writer.transport
            transport.abort()
        self.writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers.update({writer, up_writer})

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers.difference_update({writer, up_writer})


@pytest.fixture
async def proxy(envd_url: str) -> AsyncIterator[PausableProxy]:
    instance = PausableProxy(int(envd_url.rsplit(":", 1)[1]))
    await instance.resume()
    try:
        yield instance
    finally:
        await instance.pause()
