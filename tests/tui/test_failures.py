"""What a person sees when things go wrong, and what the dashboard says at start-up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.text import Text

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from backend.sampler import Sampler
from tests.conftest import scratch_paths
from tests.hostenvd import HostEnvd
from tests.tui.fakes import FrozenSampler
from tests.tui.helpers import RecordingApp, seed_capsule, wait_until
from tui.screens.build_image import BuildImageScreen
from tui.screens.create import CreateScreen
from tui.screens.main import MainScreen

pytestmark = pytest.mark.timeout(60)


def state_cell(app: RecordingApp, capsule_id: str) -> str:
    value = app.main_screen.table.get_cell(capsule_id, "state")
    return value.plain if isinstance(value, Text) else str(value)


async def test_a_failing_pause_shows_the_reason_and_the_row_matches_the_store(
    manager: CapsuleManager, sampler: Sampler, envd_pool: list[HostEnvd]
) -> None:
    # Running with a healthy envd, but no VM behind it: pause must fail, and say why.
    capsule = seed_capsule(manager.store, 0, State.RUNNING, host_port=envd_pool[0].port)
    app = RecordingApp(manager=manager, sampler=sampler, accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        await pilot.press("p")
        await app.workers.wait_for_complete()
        errors = app.notices_of("error")
        assert errors == [f"cannot pause {capsule.id}: its QEMU is not running"]
        await wait_until(pilot, lambda: capsule.id not in app.main_screen.operations)
        await pilot.pause()
        stored = manager.get(capsule.id)
        assert state_cell(app, capsule.id) == stored.state.value == "running"
        assert app.active_bindings["p"].enabled
        assert app.is_running  # no traceback took the app down


async def test_start_up_announces_what_was_re_adopted(tui_paths: Paths) -> None:
    store = Store(tui_paths.database)
    paused = seed_capsule(store, 0, State.PAUSED, generation=1)
    generation = tui_paths.snapshots / paused.id / "gen-000001"
    generation.mkdir(parents=True)
    (generation / "snapshot.json").write_text(json.dumps({}))
    vanished = seed_capsule(store, 1, State.RUNNING, pid=None)
    store.close()

    app = RecordingApp(tui_paths, sampler=FrozenSampler(), accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        await wait_until(pilot, lambda: app.notices)
        assert app.notices_of("information") == ["re-adopted 2 capsules: 1 paused, 1 error"]
        [warning] = app.notices_of("warning")
        assert warning.startswith(f"{vanished.id}: QEMU (pid None) is gone")
        await wait_until(pilot, lambda: state_cell(app, vanished.id) == "error")
        assert state_cell(app, paused.id) == "paused"

    # Leaving the dashboard stops nothing: the paused capsule is still there, as it was.
    after = Store(tui_paths.database)
    try:
        kept = after.get(paused.id)
        assert kept is not None and kept.state == State.PAUSED
    finally:
        after.close()


async def test_without_an_image_the_dashboard_offers_to_build_one(short_tmp: Path) -> None:
    real = scratch_paths(short_tmp)
    paths = Paths(short_tmp / "data", real.state, real.cache, real.config, real.shm)
    paths.ensure()
    manager = CapsuleManager(paths)
    app = RecordingApp(manager=manager, sampler=FrozenSampler(), accel="tcg", cursor_blink=False)
    try:
        async with app.run_test(size=(200, 30)) as pilot:
            await wait_until(pilot, lambda: isinstance(app.screen, BuildImageScreen))
            await pilot.press("escape")
            assert isinstance(app.screen, MainScreen)
            await pilot.press("n")
            assert isinstance(app.screen, BuildImageScreen)
            assert not isinstance(app.screen, CreateScreen)
    finally:
        await manager.close()
