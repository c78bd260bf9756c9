"""The host at a glance: the status line's room and warnings, and the host view's figures and
cleanup, on real files."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from backend.capsules.hostcost import rss_anon
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.config import Paths
from backend.dashboard import ManagerPort
from backend.sparse import allocated_bytes
from tests.integration.conftest import destroy_all, sh
from tests.tui.fakes import FrozenSampler, sample
from tests.tui.helpers import RecordingApp, seed_capsule, wait_until
from tui.host import HostTotals, capacity, capsule_costs
from tui.screens.confirm import ConfirmScreen
from tui.screens.host import HostScreen, disk_rows
from tui.widgets.status_bar import StatusBar

pytestmark = pytest.mark.timeout(60)
GIB = 2**30
MIB = 2**20


def test_capacity_from_the_running_capsules_host_cost() -> None:
    host = HostTotals(cpu_pct=5, mem_used=4 * GIB, mem_total=16 * GIB, mem_available=12 * GIB)
    room = capacity(host, [280 * MIB, 280 * MIB], 256)
    assert room.per_capsule == 280 * MIB
    assert room.capsules_cost == 560 * MIB
    assert room.fits == (12 * GIB) // (280 * MIB)
    assert room.warnings == ()
    empty = capacity(host, [], 256)
    assert empty.per_capsule == 256 * MIB and "default" in empty.basis
    full = HostTotals(1, 15 * GIB, 16 * GIB, mem_available=100 * MIB, disk_free=10 * MIB)
    assert capacity(full, [], 256).warnings == (
        "no memory for another capsule",
        "no disk for another snapshot",
    )


async def test_status_line_warns_when_one_more_capsule_would_not_fit(
    manager: CapsuleManager,
) -> None:
    seed_capsule(manager.store, 0, State.RUNNING)
    full = HostTotals(90, 15 * GIB, 16 * GIB, mem_available=100 * MIB, disk_free=50 * GIB)
    app = RecordingApp(
        manager=manager,
        sampler=FrozenSampler(),
        accel="tcg",
        cursor_blink=False,
        host_probe=lambda: full,
    )
    async with app.run_test(size=(80, 24)) as pilot:
        bar = app.main_screen.query_one(StatusBar)
        await wait_until(pilot, lambda: bar.info.warnings)
        assert bar.info.fits == 0
        line = StatusBar.render_info(bar.info, 78).plain
        assert "⚠ no memory for another capsule" in line
        assert len(line) <= 78


def test_a_capsules_cost_is_read_from_the_samplers_latest_sample_while_it_is_fresh(
    manager: CapsuleManager,
) -> None:
    """The status line asks every second: QEMU's own memory comes from the sample the sampler
    just took (statm), not from another read of /proc per capsule; a stale or missing sample
    falls back to /proc."""
    stand_in = subprocess.Popen(["sleep", "120"])
    try:
        running = seed_capsule(manager.store, 0, State.RUNNING, pid=stand_in.pid)
        port = ManagerPort(manager)
        frozen = FrozenSampler()
        fresh = dataclasses.replace(sample(running.id, 100, 5.0), ts=time.time())
        frozen.put(dataclasses.replace(fresh, host_own=7 * MIB))
        assert capsule_costs(port, frozen)[running.id].own == 7 * MIB
        own = rss_anon(stand_in.pid)
        assert own is not None and own != 7 * MIB
        frozen.put(dataclasses.replace(fresh, host_own=7 * MIB, ts=time.time() - 60))
        assert abs(capsule_costs(port, frozen)[running.id].own - own) < MIB
        frozen.put(fresh)  # no host_own: a sampler that could not read the process
        assert abs(capsule_costs(port, frozen)[running.id].own - own) < MIB
    finally:
        stand_in.kill()
        stand_in.wait()


async def test_host_view_measures_and_frees_only_orphans(manager: CapsuleManager) -> None:
    # a process stands for its QEMU: its own memory plus its RAM file is what it costs
    stand_in = subprocess.Popen(["sleep", "120"])
    running = seed_capsule(manager.store, 0, State.RUNNING, pid=stand_in.pid)
    paused = seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    layout = manager.layout
    layout.ensure_ram_dir()
    kept = layout.ram_file(running.id)
    kept.write_bytes(os.urandom(MIB))
    orphan = layout.ram_file(paused.id)
    orphan.write_bytes(os.urandom(2 * MIB))
    frozen = FrozenSampler()
    frozen.put(sample(running.id, 100, 5.0))
    app = RecordingApp(manager=manager, sampler=frozen, accel="tcg", cursor_blink=False)
    try:
        await _host_view(app, orphan, kept, stand_in.pid)
    finally:
        stand_in.kill()
        stand_in.wait()
        shutil.rmtree(layout.ram_dir, ignore_errors=True)  # in the real /dev/shm


async def _host_view(app: RecordingApp, orphan: Path, kept: Path, pid: int) -> None:
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("H")
        assert isinstance(app.screen, HostScreen)
        screen = app.screen
        await wait_until(pilot, lambda: screen.report is not None)
        report = screen.report
        assert report is not None and report.usage is not None
        assert report.running == 1
        own = rss_anon(pid)
        assert own is not None
        # the running capsule's cost: its process's own memory and its RAM file
        assert report.room.capsules_cost == own + allocated_bytes(kept)
        assert "host cost" in report.room.basis
        assert report.usage.used["guest RAM files"] >= 3 * MIB
        assert [item.path for item in report.usage.reclaimable] == [orphan]
        labels = [label for label, _ in disk_rows(report)]
        assert "can be freed: orphan RAM files" in labels
        assert app.active_bindings["F"].enabled
        await pilot.press("F")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: app.notices_of("information"))
        assert app.notices_of("information")[-1].startswith("freed 2.0M (1 items)")
        assert not orphan.exists()
        assert kept.exists() and kept.stat().st_size == MIB
        await wait_until(
            pilot,
            lambda: (
                screen.report is not None
                and screen.report.usage is not None
                and not screen.report.usage.reclaimable
            ),
        )
        await pilot.press("escape")
        assert not isinstance(app.screen, HostScreen)


@pytest.mark.vm
@pytest.mark.timeout(600)
async def test_freeing_space_beside_a_paused_and_a_running_capsule(tui_paths: Paths) -> None:
    """Orphans lie beside a paused capsule and a running one; `F` removes the orphans only,
    and both capsules carry on (the paused one resumes with its files, the running one runs)."""
    app = RecordingApp(tui_paths, cursor_blink=False)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            manager = app.manager
            layout = manager.layout
            paused = await app.backend.create("default", 256, 1, "none")
            await sh(manager, paused.id, "echo still-here > /root/marker")
            await app.backend.pause(paused.id)
            running = await app.backend.create("default", 256, 1, "none")
            # a clone of the template: its RAM is the template's, no file of its own
            assert not layout.ram_file(running.id).exists()
            generation = layout.generation(paused.id, manager.get(paused.id).generation)
            needed = [*generation.iterdir(), layout.disk(running.id)]
            orphans = [
                write_file(layout.ram_dir / "cl-crashed00000.mem", age_s=3600),
                write_file(layout.ram_file(paused.id)),  # a crash left it after the snapshot
                write_file(layout.snapshot_dir(paused.id) / "gen-000099.tmp" / "mem"),
                write_file(layout.work / "fork-dead" / "capture" / "mem"),
            ]
            past = time.time() - 3600  # a work dir with no lock, left a while ago
            os.utime(layout.work / "fork-dead", (past, past))
            # the host view's cost figure is the sampler's: wait for its first sample of the
            # running capsule (created a moment ago)
            await wait_until(
                pilot,
                lambda: bool((s := app.sampler.latest(running.id)) and s.host_rss),
                timeout=30,
            )
            await pilot.press("H")
            screen = app.screen
            assert isinstance(screen, HostScreen)
            await wait_until(
                pilot,
                lambda: screen.report is not None and screen.report.usage is not None,
                timeout=30,
            )
            assert screen.report is not None and screen.report.usage is not None
            found = {item.path for item in screen.report.usage.reclaimable}
            assert found == {
                orphans[0],
                orphans[1],
                orphans[2].parent,
                orphans[3].parent.parent,
            }
            assert screen.report.room.capsules_cost > 0  # the running QEMU's RSS
            await pilot.press("F", "y")
            await wait_until(pilot, lambda: app.notices_of("information"), timeout=30)
            for path in orphans:
                assert not path.exists()
            for path in needed:
                assert path.exists(), path
            assert (await sh(manager, running.id, "echo ok")).strip() == "ok"
            await app.backend.resume(paused.id)
            assert (await sh(manager, paused.id, "cat /root/marker")).strip() == "still-here"
            assert app.notices_of("error") == []
    finally:
        await destroy_all(tui_paths)


def write_file(path: Path, age_s: float = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(MIB))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))
    return path
