"""Real envd processes on the host, capsule rows seeded into a real Store, and pilot waits."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from textual.notifications import SeverityLevel
from textual.pilot import Pilot

from backend.capsules.models import Capsule, State
from backend.capsules.store import Store
from tui.app import WrennApp

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HostEnvd:
    proc: subprocess.Popen[bytes]
    port: int

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_envds(count: int, root: Path, timeout: float = 60.0) -> list[HostEnvd]:
    """Start `count` host-mode envd processes at once and wait until all answer /health."""
    started: list[HostEnvd] = []
    try:
        for index in range(count):
            envd_root = root / f"envd-{index}"
            envd_root.mkdir(parents=True)
            port = free_port()
            with open(root / f"envd-{index}.log", "wb") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "backend.envd", "--host", "127.0.0.1",
                     "--port", str(port), "--root", str(envd_root)],
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            started.append(HostEnvd(proc, port))
        deadline = time.monotonic() + timeout
        waiting = list(started)
        while waiting:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(waiting)} envd processes did not answer in time")
            for envd in list(waiting):
                if envd.proc.poll() is not None:
                    raise RuntimeError(f"envd on port {envd.port} exited: see {root}")
                try:
                    if httpx.get(f"http://127.0.0.1:{envd.port}/health", timeout=1).is_success:
                        waiting.remove(envd)
                except httpx.TransportError:
                    pass
            time.sleep(0.05)
    except BaseException:
        for envd in started:
            envd.stop()
        raise
    return started


def seed_capsule(
    store: Store,
    index: int,
    state: State = State.RUNNING,
    host_port: int = 1,
    created_at: float = 1_700_000_000.0,
    **changes: object,
) -> Capsule:
    """A capsule row with no VM behind it (pid None); with `host_port` at a host envd the
    sampler polls real metrics."""
    capsule = Capsule(
        id=f"cl-test{index:08d}",
        state=state,
        template="default",
        image_dir="/nonexistent",
        memory_mib=256,
        vcpus=1,
        created_at=created_at + index,
        host_port=host_port,
        access_token="",
        started_at=created_at + index if state == State.RUNNING else None,
    ).with_(**changes)
    store.put(capsule)
    return capsule


async def wait_until(
    pilot: Pilot[Any], predicate: Callable[[], object], timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await pilot.pause(0.05)


class RecordingApp(WrennApp):
    """The real app, keeping every notification it showed so tests can read them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.notices: list[tuple[str, str]] = []

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: SeverityLevel = "information",
        timeout: float | None = None,
        markup: bool = True,
    ) -> None:
        self.notices.append((severity, message))
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)

    def notices_of(self, severity: str) -> list[str]:
        return [message for level, message in self.notices if level == severity]
