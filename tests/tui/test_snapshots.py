"""Frozen screens: fixed capsules, fixed metrics, a stopped clock and a fixed host.

Update after an intended change with `pytest tests/tui/test_snapshots.py --snapshot-update`,
and look at the report before committing the new SVGs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import pytest

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Snapshot, State
from backend.config import Paths
from backend.runtime.base import BalloonStats
from tests.tui.fakes import FROZEN_NOW, FrozenSampler, sample
from tests.tui.helpers import seed_capsule
from tui.app import WrennApp
from tui.host import HostTotals

pytestmark = pytest.mark.timeout(60)

SnapCompare = Callable[..., bool]
HOST = HostTotals(cpu_pct=23.0, mem_used=6 * 2**30, mem_total=24 * 2**30)
MIB = 2**20
IDS = ("cl-k3v9q2m7x1ab", "cl-k3v9q2w0c8dd", "cl-7hzp4nq2e5tt", "cl-a0r6yb3kd2uf")
SIZES = [(80, 24), (120, 40), (200, 50)]


def wave(length: int, base: float, swing: float, period: float) -> list[float]:
    return [base + swing * math.sin(i / period) for i in range(length)]


@pytest.fixture
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def frozen_app(tui_paths: Paths, utc: None) -> Iterator[WrennApp]:
    manager = CapsuleManager(tui_paths)
    store = manager.store
    started = FROZEN_NOW - 3723
    # Ids as the manager makes them; two share their first 6 characters, so the short ids
    # shown in narrow windows are 7 long.
    web = seed_capsule(store, 0, State.RUNNING, started_at=started, generation=1, id=IDS[0])
    batch = seed_capsule(
        store, 1, State.RUNNING, started_at=started + 3000, memory_mib=512, id=IDS[1]
    )
    idle = seed_capsule(store, 2, State.PAUSED, generation=3, id=IDS[2])
    seed_capsule(
        store,
        3,
        State.ERROR,
        reason="QEMU exited unexpectedly; see the console log",
        id=IDS[3],
    )
    for capsule, gen in ((web, 1), (idle, 3)):
        store.put_snapshot(
            Snapshot(
                capsule_id=capsule.id,
                generation=gen,
                path=str(tui_paths.snapshots / capsule.id / f"gen-{gen:06d}"),
                created_at=FROZEN_NOW - 7200,
                ram_size=256 * MIB,
                ram_allocated=92 * MIB,
                ram_sha256="",
                disk_allocated=6 * MIB,
                disk_sha256="",
                state_size=70_000,
                state_sha256="",
                pause_seconds=3.4,
            )
        )
    frozen = FrozenSampler()
    frozen.put(
        sample(web.id, 118, 12.0),
        {
            "guest_mem_used": [v * MIB for v in wave(300, 110, 20, 9)],
            "guest_mem_cache": [v * MIB for v in wave(300, 60, 10, 17)],
            "host_rss": [v * MIB for v in wave(300, 290, 5, 30)],
            "guest_cpu_pct": wave(300, 30, 28, 4),
            "host_cpu_pct": wave(300, 36, 30, 4),
        },
    )
    frozen.put(
        sample(batch.id, 420, 97.0, total_mib=496),
        {"guest_mem_used": [v * MIB for v in wave(40, 400, 40, 6)], "guest_cpu_pct": [97.0] * 40},
    )
    frozen.balloons[web.id] = BalloonStats(
        actual=256 * MIB,
        free=130 * MIB,
        total=240 * MIB,
        available=150 * MIB,
        disk_caches=60 * MIB,
        last_update=None,
    )
    (manager.layout.run_dir(web.id)).mkdir(parents=True)
    (manager.layout.run_dir(web.id) / "console.log").write_text(
        "[    0.000000] Linux version 6.1.0-28-cloud-amd64\r\n"
        "wrenn-init: mounting /proc /sys /dev\r\n"
        "wrenn-init: envd started (pid 112)\r\n"
    )
    app = WrennApp(
        manager=manager,
        sampler=frozen,
        clock=lambda: FROZEN_NOW,
        host_probe=lambda: HOST,
        accel="tcg",
        cursor_blink=False,
    )
    try:
        yield app
    finally:
        store.close()


def test_main_screen(snap_compare: SnapCompare, frozen_app: WrennApp) -> None:
    assert snap_compare(frozen_app, press=["C"], terminal_size=(200, 16))


@pytest.mark.parametrize("size", SIZES, ids=lambda size: f"{size[0]}x{size[1]}")
def test_main_screen_fits_the_window(
    snap_compare: SnapCompare, frozen_app: WrennApp, size: tuple[int, int]
) -> None:
    """Every row shows its id, state and both sparklines with their values at any size."""
    assert snap_compare(frozen_app, press=["M"], terminal_size=size)


def test_detail_screen(snap_compare: SnapCompare, frozen_app: WrennApp) -> None:
    assert snap_compare(frozen_app, press=["enter"], terminal_size=(200, 48))


def test_create_form(snap_compare: SnapCompare, frozen_app: WrennApp) -> None:
    assert snap_compare(frozen_app, press=["n"], terminal_size=(120, 24))
