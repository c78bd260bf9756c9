"""Real envd processes in host mode for the sampler, a port that never answers, and a store."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from backend.capsules.store import Store
from backend.sampler import Target

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HostEnvd:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def target(self, capsule_id: str, token: str | None = None) -> Target:
        return Target(capsule_id, self.url, token, self.proc.pid)


def _wait_healthy(envd: HostEnvd, deadline: float) -> None:
    while time.monotonic() < deadline:
        if envd.proc.poll() is not None:
            raise RuntimeError(f"envd exited: {envd.log.read_text(errors='replace')}")
        try:
            if httpx.get(f"{envd.url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"envd not healthy: {envd.log.read_text(errors='replace')}")


@pytest.fixture
def start_envds(tmp_path: Path) -> Iterator[Callable[[int], list[HostEnvd]]]:
    """Start n envds at once (they boot in parallel) and wait until all answer /health."""
    started: list[HostEnvd] = []

    def start(n: int) -> list[HostEnvd]:
        batch = []
        for _ in range(n):
            port = free_port()
            root = tmp_path / f"root-{port}"
            root.mkdir()
            log = tmp_path / f"envd-{port}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "backend.envd", "--host", "127.0.0.1",
                     "--port", str(port), "--root", str(root)],
                    cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                )  # fmt: skip
            batch.append(HostEnvd(proc, port, log))
        started.extend(batch)
        deadline = time.monotonic() + 30
        for envd in batch:
            _wait_healthy(envd, deadline)
        return batch

    yield start
    for envd in started:
        envd.proc.terminate()
    for envd in started:
        try:
            envd.proc.wait(5)
        except subprocess.TimeoutExpired:
            envd.proc.kill()
            envd.proc.wait(5)


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port whose listener accepts connections (the kernel does) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        yield int(s.getsockname()[1])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    db = Store(tmp_path / "state.db")
    yield db
    db.close()
