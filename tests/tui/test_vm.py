"""End to end on a real capsule (QEMU): create from the form, watch it, pause, resume, leave the
dashboard with it running, come back to find it re-adopted, and destroy it from the keyboard."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from rich.text import Text
from textual.pilot import Pilot

from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from tests.integration.conftest import destroy_all
from tests.tui.helpers import RecordingApp, wait_until
from tui.screens.create import CreateScreen
from tui.widgets import capsule_table
from tui.widgets.sparkline import BLOCKS

pytestmark = [pytest.mark.vm, pytest.mark.timeout(240)]


def cell(app: RecordingApp, capsule_id: str, column: str) -> str:
    value = app.main_screen.table.get_cell(capsule_id, column)
    return value.plain if isinstance(value, Text) else str(value)


def pid_alive(pid: int) -> bool:
    """A zombie counts as dead: QEMU started by this test process stays one until reaped."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class StateLabels:
    """Every state label the table computed for each row, in order: a transition shorter than
    a test can poll (a clone pauses in ~0.4 s) is still seen."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.labels: dict[str, list[str]] = {}
        real = capsule_table._state_cell

        def spy(view: capsule_table.CapsuleView) -> Text:
            text = real(view)
            seq = self.labels.setdefault(view.capsule.id, [])
            if not seq or seq[-1] != text.plain:
                seq.append(text.plain)
            return text

        monkeypatch.setattr(capsule_table, "_state_cell", spy)

    def forget(self, capsule_id: str) -> None:
        self.labels.pop(capsule_id, None)


async def states_until(
    pilot: Pilot[None],
    app: RecordingApp,
    capsule_id: str,
    final: str,
    timeout: float,
    computed: StateLabels | None = None,
) -> list[str]:
    """Every state label the row showed until it read `final` (with `computed`: every label
    the table computed for it, since its last `forget`)."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        label = cell(app, capsule_id, "state")
        if not seen or seen[-1] != label:
            seen.append(label)
        if label == final:
            if computed is not None:
                return computed.labels.get(capsule_id, [])
            return seen
        if time.monotonic() > deadline:
            raise AssertionError(f"{capsule_id} never became {final}: {seen}; {app.notices}")
        await pilot.pause(0.03)


@pytest.fixture
async def vm_paths(tui_paths: Paths) -> AsyncIterator[Paths]:
    """A bootable image is enough here (whether its envd is the newest is the integration
    suite's concern); no QEMU is left behind whatever the test did."""
    try:
        yield tui_paths
    finally:
        await destroy_all(tui_paths)


async def test_a_capsule_from_create_to_destroy(
    vm_paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    computed = StateLabels(monkeypatch)
    app = RecordingApp(vm_paths, cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        table = app.main_screen.table
        await pilot.press("n")
        assert isinstance(app.screen, CreateScreen)
        await pilot.press("enter")  # the defaults: 256 MiB, 1 vCPU
        await wait_until(pilot, lambda: table.row_count == 1, timeout=30)
        capsule_id = table.selected_id
        assert capsule_id is not None
        seen = await states_until(pilot, app, capsule_id, "running", timeout=150)
        assert seen[0] == "creating…", seen
        assert app.notices_of("error") == []

        await wait_until(
            pilot, lambda: sum(ch in BLOCKS for ch in cell(app, capsule_id, "mem")) >= 3, 20
        )
        assert sum(ch in BLOCKS for ch in cell(app, capsule_id, "cpu")) >= 3
        assert cell(app, capsule_id, "health") == "● ok"
        # The QEMU process is known, so its RSS and CPU stand beside the guest's figures.
        assert " rss " in cell(app, capsule_id, "mem")
        assert " host " in cell(app, capsule_id, "cpu")

        computed.forget(capsule_id)
        await pilot.press("p")
        seen = await states_until(pilot, app, capsule_id, "paused", timeout=60, computed=computed)
        assert "pausing…" in seen, seen
        assert cell(app, capsule_id, "snapshot") != "—"
        assert app.active_bindings["r"].enabled and not app.active_bindings["p"].enabled

        computed.forget(capsule_id)
        await pilot.press("r")
        seen = await states_until(pilot, app, capsule_id, "running", timeout=60, computed=computed)
        assert "resuming…" in seen, seen
        await wait_until(
            pilot,
            lambda: any(
                message.startswith(f"{capsule_id} is running again")
                for message in app.notices_of("information")
            ),
        )
        assert app.notices_of("error") == []

    # Leaving the dashboard leaves the capsule running.
    store = Store(vm_paths.database)
    try:
        kept = store.get(capsule_id)
    finally:
        store.close()
    assert kept is not None and kept.state == State.RUNNING and kept.pid is not None
    assert pid_alive(kept.pid)

    again = RecordingApp(vm_paths, cursor_blink=False)
    async with again.run_test(size=(200, 30)) as pilot:
        await wait_until(pilot, lambda: again.notices, timeout=20)
        assert again.notices_of("information")[0] == "re-adopted 1 capsule: 1 running"
        await wait_until(pilot, lambda: again.main_screen.table.selected_id == capsule_id)
        await pilot.press("ctrl+d", "y")
        await wait_until(pilot, lambda: again.main_screen.table.row_count == 0, timeout=30)
        assert f"{capsule_id} destroyed" in again.notices_of("information")
    await wait_until_dead(kept.pid)


async def wait_until_dead(pid: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise AssertionError(f"QEMU {pid} still runs after destroy")
        await asyncio.sleep(0.1)
