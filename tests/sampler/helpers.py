"""Fakes at the edge of the sampler's unit tests, and the host's own memory figures."""

from __future__ import annotations

import time
from pathlib import Path

from backend.capsules.models import Capsule, State
from backend.capsules.store import Store
from backend.runtime.base import BalloonStats
from backend.sampler import Target


def put_capsule(
    store: Store,
    capsule_id: str,
    state: State = State.RUNNING,
    port: int = 1,
    pid: int | None = None,
    token: str = "",
) -> Capsule:
    capsule = Capsule(
        id=capsule_id,
        state=state,
        template="default",
        image_dir="/nonexistent",
        memory_mib=256,
        vcpus=1,
        created_at=time.time(),
        host_port=port,
        access_token=token,
        pid=pid,
    )
    store.put(capsule)
    return capsule


class FakeSource:
    """A TargetSource whose targets the test changes between ticks."""

    def __init__(self, targets: list[Target] | None = None) -> None:
        self.current: list[Target] = list(targets or [])
        self.balloon_calls: list[str] = []
        self.balloon_answer: BalloonStats | None = BalloonStats(
            actual=256 << 20, free=100 << 20, total=250 << 20, available=200 << 20,
            disk_caches=10 << 20, last_update=1,
        )  # fmt: skip
        self.targets_delay = 0.0
        """Seconds targets() blocks the event loop (a stuck source)."""
        self.calls = 0

    def targets(self) -> list[Target]:
        self.calls += 1
        if self.targets_delay:
            time.sleep(self.targets_delay)
        return list(self.current)

    async def balloon_stats(self, capsule_id: str) -> BalloonStats | None:
        self.balloon_calls.append(capsule_id)
        return self.balloon_answer


def meminfo_used() -> tuple[int, int]:
    """(MemTotal, MemTotal - MemAvailable) of this host, bytes."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        values[name] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values["MemTotal"] - values["MemAvailable"]
