"""Real envd processes on the host, capsule rows seeded into a real Store, and pilot waits."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from textual.notifications import SeverityLevel
from textual.pilot import Pilot

from backend.capsules.models import Capsule, State
from backend.capsules.store import Store
from tui.app import WrennApp


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
