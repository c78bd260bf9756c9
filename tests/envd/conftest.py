"""Real envd processes in host mode (``--root`` a temporary directory), spoken to over HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests import hostenvd
from tests.hostenvd import HostEnvd


@dataclass
class Envd(HostEnvd):
    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/pty"

    @property
    def home(self) -> Path:
        # Tests run as root in CI; the host-mode home is the invoking user's home under root.
        return self.root / Path(os.path.expanduser("~")).relative_to("/")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=15, **kwargs)


def start_envd(
    root: Path, *args: str, prefix: tuple[str, ...] = (), guest_mode: bool = False
) -> Envd:
    """``guest_mode`` leaves out ``--root``: paths are the host's, as in a capsule."""
    return hostenvd.start(root, *args, cls=Envd, prefix=prefix, host_mode=not guest_mode)


@pytest.fixture(scope="session")
def envd() -> Iterator[Envd]:
    """One shared instance; tests must not set a token or change thresholds on it."""
    with tempfile.TemporaryDirectory(prefix="envd-shared-") as tmp:
        instance = start_envd(Path(tmp) / "root")
        try:
            yield instance
        finally:
            assert instance.stop(), f"envd ignored SIGTERM:\n{instance.log()}"
            assert "Traceback" not in instance.log(), instance.log()


@pytest.fixture
def envd_factory(tmp_path: Path) -> Iterator[Callable[..., Envd]]:
    started: list[Envd] = []

    def factory(
        *args: str, prefix: tuple[str, ...] = (), name: str = "root", guest_mode: bool = False
    ) -> Envd:
        instance = start_envd(tmp_path / name, *args, prefix=prefix, guest_mode=guest_mode)
        started.append(instance)
        return instance

    yield factory
    hung = [instance for instance in started if not instance.stop()]
    assert not hung, f"envd ignored SIGTERM:\n{hung[0].log()}"
    for instance in started:
        # Bad input must be answered, never crash a handler.
        assert "Traceback" not in instance.log(), instance.log()


@pytest.fixture
def client(envd: Envd) -> Iterator[httpx.Client]:
    with envd.client() as c:
        yield c


class Pty:
    """A /pty WebSocket client that keeps the output it has seen."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.output = ""
        self.messages: list[dict[str, Any]] = []

    async def send(self, **message: Any) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = 10) -> dict[str, Any]:
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            message: dict[str, Any] = json.loads(raw)
            self.messages.append(message)
            if message["type"] == "output":
                self.output += message["data"]
            if message["type"] != "ping":
                return message

    async def expect(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        """Next message of type ``kind``, skipping output (which is still collected)."""
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if message["type"] == kind:
                return message
            if message["type"] != "output":
                raise AssertionError(f"expected {kind}, got {message}")

    async def read_until(self, text: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{text!r} never appeared in output: {self.output[-2000:]!r}")
            message = await self.recv(remaining)
            if message["type"] not in ("output",):
                raise AssertionError(f"unexpected {message} while waiting for {text!r}")
        return self.output


@contextlib.asynccontextmanager
async def pty_socket(envd: Envd, **kwargs: Any) -> Any:
    async with connect(envd.ws_url, max_size=None, **kwargs) as ws:
        yield Pty(ws)


def wait_for(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
