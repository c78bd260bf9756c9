"""Real envd processes in host mode for the sampler, a port that never answers, and a store."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.capsules.store import Store
from backend.sampler import Target
from tests import hostenvd


@dataclass
class HostEnvd(hostenvd.HostEnvd):
    def target(self, capsule_id: str, token: str | None = None) -> Target:
        return Target(capsule_id, self.url, token, self.proc.pid)


@pytest.fixture
def start_envds(tmp_path: Path) -> Iterator[Callable[[int], list[HostEnvd]]]:
    """Start n envds at once (they boot in parallel) and wait until all answer /health."""
    started: list[HostEnvd] = []

    def start(n: int) -> list[HostEnvd]:
        batch = [
            hostenvd.spawn(tmp_path / f"root-{len(started) + i}", cls=HostEnvd) for i in range(n)
        ]
        started.extend(batch)
        hostenvd.wait_healthy(batch, timeout=30)
        return batch

    yield start
    hostenvd.stop_all(started)


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
