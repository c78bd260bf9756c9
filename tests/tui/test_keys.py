"""Keys: greyed out where they cannot apply, the dialogs behind them, help and the palette."""

from __future__ import annotations

import asyncio
import time

import pytest
from textual.widgets import DataTable, Label, RadioSet

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from tests.tui.fakes import FrozenSampler
from tests.tui.helpers import RecordingApp, seed_capsule, wait_until
from tui.commands import CapsuleCommands
from tui.screens.confirm import ConfirmScreen
from tui.screens.create import CreateRequest, CreateScreen
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen

pytestmark = pytest.mark.timeout(60)

VERB_KEYS = ("p", "r", "ctrl+d", "enter")


def enabled(app: RecordingApp) -> dict[str, bool]:
    bindings = app.active_bindings
    return {key: bindings[key].enabled for key in (*VERB_KEYS, "n")}


def app_for(manager: CapsuleManager, sampler: FrozenSampler | None = None) -> RecordingApp:
    return RecordingApp(
        manager=manager, sampler=sampler or FrozenSampler(), accel="tcg", cursor_blink=False
    )


async def test_keys_that_cannot_apply_to_the_selection_are_disabled(
    manager: CapsuleManager,
) -> None:
    seed_capsule(manager.store, 0, State.RUNNING)
    seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    seed_capsule(manager.store, 2, State.ERROR, reason="QEMU exited unexpectedly")
    seed_capsule(manager.store, 3, State.PAUSING)
    app = app_for(manager)
    async with app.run_test(size=(200, 30)) as pilot:
        assert enabled(app) == {"p": True, "r": False, "ctrl+d": True, "enter": True, "n": True}
        await pilot.press("j")
        assert enabled(app) == {"p": False, "r": True, "ctrl+d": True, "enter": True, "n": True}
        await pilot.press("j")
        assert enabled(app) == {"p": False, "r": False, "ctrl+d": True, "enter": True, "n": True}
        await pilot.press("j")
        assert enabled(app) == {"p": False, "r": False, "ctrl+d": False, "enter": True, "n": True}

        # A disabled key does nothing at all: no worker, no state change, no message.
        await pilot.press("k", "k")
        assert app.main_screen.table.selected_id == "cl-test00000001"
        await pilot.press("p")
        await app.workers.wait_for_complete()
        assert manager.get("cl-test00000001").state == State.PAUSED
        assert app.notices == []

        # The state changes under the selection (another process resumed it): keys follow.
        manager.store.put(manager.get("cl-test00000001").with_(state=State.RUNNING))
        app.capsules_changed()
        await wait_until(pilot, lambda: app.active_bindings["p"].enabled)
        assert not app.active_bindings["r"].enabled


async def test_an_empty_table_only_offers_create(manager: CapsuleManager) -> None:
    app = app_for(manager)
    async with app.run_test(size=(200, 30)):
        assert enabled(app) == {"p": False, "r": False, "ctrl+d": False, "enter": False, "n": True}


async def test_create_form_validates_and_cancels(manager: CapsuleManager) -> None:
    app = app_for(manager)
    async with app.run_test(size=(200, 30)) as pilot:
        await pilot.press("n")
        assert isinstance(app.screen, CreateScreen)
        await pilot.press(*["backspace"] * 3, "1", "2", "enter")
        assert isinstance(app.screen, CreateScreen)
        assert "memory must be a whole number from 64 to 65536" in str(
            app.screen.query_one("#error", Label).render()
        )
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        await app.workers.wait_for_complete()
        assert manager.list_capsules() == []


async def test_destroy_asks_first_then_removes_the_capsule(manager: CapsuleManager) -> None:
    paused = seed_capsule(manager.store, 0, State.PAUSED, generation=1)
    frozen = FrozenSampler()
    app = app_for(manager, frozen)
    async with app.run_test(size=(200, 30)) as pilot:
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("enter")  # Cancel has the focus: a stray enter destroys nothing
        assert isinstance(app.screen, MainScreen)
        assert manager.store.get(paused.id) is not None

        await pilot.press("ctrl+d", "y")
        await app.workers.wait_for_complete()
        await wait_until(pilot, lambda: app.main_screen.table.row_count == 0)
        assert manager.store.get(paused.id) is None
        assert frozen.forgotten == [paused.id]
        assert f"{paused.id} destroyed" in app.notices_of("information")


async def test_help_lists_the_keys(manager: CapsuleManager) -> None:
    seed_capsule(manager.store, 0, State.RUNNING)
    app = app_for(manager)
    async with app.run_test(size=(200, 40)) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one(DataTable)
        actions = {str(table.get_row_at(i)[1]) for i in range(table.row_count)}
        assert {"New", "Pause", "Resume", "Destroy", "Details", "Filter"} <= actions
        assert {"Sort CPU", "Sort mem", "Quit", "Command palette"} <= actions
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_command_palette_offers_the_actions_that_apply(manager: CapsuleManager) -> None:
    running = seed_capsule(manager.store, 0, State.RUNNING)
    paused = seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    app = app_for(manager)
    async with app.run_test(size=(200, 30)):
        provider = CapsuleCommands(app.screen)
        names = [str(hit.text) async for hit in provider.discover()]
        assert f"Pause {running.id}" in names
        assert f"Resume {paused.id}" in names
        assert f"Pause {paused.id}" not in names
        assert f"Resume {running.id}" not in names
        assert {"New capsule", "Sort by CPU", "Sort by memory"} <= set(names)

        hits = [hit async for hit in provider.search("sort cpu")]
        assert hits and str(hits[0].text) == "Sort by CPU"
        hits[0].command()
        assert app.main_screen.table.row_sort.label == "cpu ↓"


async def test_quit_asks_first_while_an_operation_runs(manager: CapsuleManager) -> None:
    app = app_for(manager)
    async with app.run_test(size=(200, 30)) as pilot:
        # Stands in for a long create: what matters is a lifecycle worker still running.
        slow = app.run_worker(asyncio.sleep(30), group="lifecycle", exit_on_error=False)
        await pilot.press("q")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert isinstance(app.screen, MainScreen) and app.is_running
        slow.cancel()
        await wait_until(pilot, lambda: slow.is_finished)
        await pilot.press("q")
        await wait_until(pilot, lambda: not app.is_running)


async def test_create_form_takes_the_network_mode_from_the_keyboard(
    manager: CapsuleManager,
) -> None:
    app = app_for(manager)
    answers: list[CreateRequest | None] = []
    async with app.run_test(size=(200, 30)) as pilot:
        app.push_screen(CreateScreen(cursor_blink=False), answers.append)
        await pilot.pause()
        await pilot.press("tab", "tab")  # memory -> vCPUs -> network
        assert isinstance(app.focused, RadioSet)
        await pilot.press("down", "enter")  # highlight and choose "internet"
        await pilot.press("tab", "enter")  # the Create button
        await pilot.pause()
    assert answers == [CreateRequest(memory_mib=256, vcpus=1, network="internet")]


async def test_create_form_defaults_to_an_isolated_capsule(manager: CapsuleManager) -> None:
    app = app_for(manager)
    answers: list[CreateRequest | None] = []
    async with app.run_test(size=(200, 30)) as pilot:
        app.push_screen(CreateScreen(cursor_blink=False), answers.append)
        await pilot.pause()
        await pilot.press("enter")
        await pilot.pause()
    assert answers == [CreateRequest(memory_mib=256, vcpus=1, network="none")]


async def test_state_comes_down_as_data(manager: CapsuleManager) -> None:
    """Issue 15 goal 3: a record the manager saves reaches its row through the app's message,
    without the screen reading the store; the operations the app has in flight are the
    screen's own copy, sent down, and turn the row's keys off."""
    from tui import messages as msg

    capsule = seed_capsule(manager.store, 0, State.RUNNING)
    app = app_for(manager)
    async with app.run_test(size=(200, 30)) as pilot:
        screen = app.main_screen
        screen.last_tick_at = time.monotonic() + 600  # no stalled-sampler re-read meanwhile
        reads: list[int] = []
        real_list = app.backend.list_capsules

        def counting_list() -> list[Capsule]:
            reads.append(1)
            return real_list()

        app.backend.list_capsules = counting_list  # type: ignore[method-assign]
        manager.save(manager.get(capsule.id).with_(state=State.PAUSED, generation=1))
        await wait_until(pilot, lambda: screen.capsules[0].state == State.PAUSED)
        await pilot.pause()
        assert reads == []
        assert enabled(app)["r"] and not enabled(app)["p"]

        app.main_screen.post_message(msg.OperationChanged(capsule.id, "resuming"))
        await wait_until(pilot, lambda: screen.operations == {capsule.id: "resuming"})
        await pilot.pause()
        assert not enabled(app)["r"]
        app.main_screen.post_message(msg.OperationChanged(capsule.id, None))
        await wait_until(pilot, lambda: screen.operations == {})
        await wait_until(pilot, lambda: enabled(app)["r"])
