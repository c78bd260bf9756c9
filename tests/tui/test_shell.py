"""The shell pane inside the dashboard: `s` opens it for the selected capsule, keys reach the
shell, ctrl+] gives the keyboard back, `x` closes it; with a real capsule the same shell
survives a pause and resume."""

from __future__ import annotations

import pytest

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.config import Paths
from tests.hostenvd import HostEnvd
from tests.integration.conftest import destroy_all
from tests.tui.fakes import FrozenSampler
from tests.tui.helpers import RecordingApp, seed_capsule, wait_until
from tui.terminal import TerminalPane
from tui.widgets.capsule_table import CapsuleTable


def screen_text(pane: TerminalPane) -> str:
    return "\n".join(pane.emulator.display)


async def type_line(pilot: object, text: str) -> None:
    for ch in text:
        await pilot.press("space" if ch == " " else ch)  # type: ignore[attr-defined]
    await pilot.press("enter")  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
async def test_shell_pane_opens_types_detaches_and_closes(
    manager: CapsuleManager, envd_pool: list[HostEnvd]
) -> None:
    seed_capsule(manager.store, 0, State.RUNNING, host_port=envd_pool[0].port)
    seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    app = RecordingApp(manager=manager, sampler=FrozenSampler(), accel="tcg", cursor_blink=False)
    async with app.run_test(size=(160, 50)) as pilot:
        assert app.active_bindings["s"].enabled
        await pilot.press("j")
        assert not app.active_bindings["s"].enabled, "a paused capsule has no shell to open"
        await pilot.press("k", "s")
        await wait_until(pilot, lambda: len(app.screen.query(TerminalPane)) == 1)
        pane = app.screen.query_one(TerminalPane)
        assert pane.capsule_id == "cl-test00000000" and pane.has_focus
        await wait_until(pilot, lambda: pane.client is not None and pane.client.pid, 15)
        await type_line(pilot, "echo hello-$((6*7))")
        await wait_until(pilot, lambda: "hello-42" in screen_text(pane), 15)
        await pilot.press("ctrl+right_square_bracket")
        await wait_until(pilot, lambda: app.main_screen.query_one(CapsuleTable).has_focus)
        # keys go to the dashboard again, and `x` closes the pane
        await pilot.press("x")
        await wait_until(pilot, lambda: len(app.screen.query(TerminalPane)) == 0)


@pytest.mark.vm
@pytest.mark.timeout(240)
async def test_same_shell_after_pause_and_resume(tui_paths: Paths) -> None:
    manager = CapsuleManager(tui_paths)
    try:
        await manager.start(watchdog=False)
        capsule = await manager.create()
        app = RecordingApp(tui_paths, manager=manager, cursor_blink=False)
        async with app.run_test(size=(160, 50)) as pilot:
            await wait_until(pilot, lambda: app.main_screen.table.selected_id == capsule.id, 20)
            await pilot.press("s")
            await wait_until(pilot, lambda: len(app.screen.query(TerminalPane)) == 1)
            pane = app.screen.query_one(TerminalPane)
            await wait_until(pilot, lambda: pane.client is not None and pane.client.pid, 30)
            await type_line(pilot, "cd /tmp; export X=1; echo ready-$((2+2))")
            await wait_until(pilot, lambda: "ready-4" in screen_text(pane), 30)
            pid = pane.client.pid if pane.client else None

            await pilot.press("ctrl+right_square_bracket", "p")
            await wait_until(pilot, lambda: manager.get(capsule.id).state == State.PAUSED, 60)
            await wait_until(pilot, lambda: "paused" in (pane.status or ""), 10)
            await pilot.press("r")
            await wait_until(pilot, lambda: manager.get(capsule.id).state == State.RUNNING, 60)

            await pilot.press("s")
            await type_line(pilot, "pwd; echo X=$X")
            await wait_until(pilot, lambda: "X=1" in screen_text(pane), 30)
            assert "/tmp" in screen_text(pane).split("X=1")[0].rsplit("pwd", 1)[-1]
            assert pane.client is not None and pane.client.pid == pid, "not the same shell"
    finally:
        await manager.close()
        await destroy_all(tui_paths)
