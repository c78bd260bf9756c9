"""Templates and forks from the dashboard: `t`, `f`, the templates view and the create form.

The first tests run on seeded capsules (no VM): which keys apply in which state, and every bad
answer ends in a clear notification with nothing changed. The last runs on real capsules
(QEMU): save a running capsule as a template, start a capsule from it with the form, fork, and
the templates view refusing to delete a template in use."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from textual.widgets import Input, Label

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.config import Paths
from tests.integration.conftest import destroy_all, sh
from tests.tui.fakes import FrozenSampler
from tests.tui.helpers import RecordingApp, seed_capsule, wait_until
from tui.commands import CapsuleCommands
from tui.screens.confirm import ConfirmScreen
from tui.screens.create import CreateScreen
from tui.screens.main import MainScreen
from tui.screens.prompt import PromptScreen
from tui.screens.templates import TemplatesScreen

pytestmark = pytest.mark.timeout(60)


def app_for(manager: CapsuleManager) -> RecordingApp:
    return RecordingApp(manager=manager, sampler=FrozenSampler(), accel="tcg", cursor_blink=False)


def keys(app: RecordingApp) -> dict[str, bool]:
    return {key: app.active_bindings[key].enabled for key in ("t", "f")}


async def test_template_and_fork_keys_follow_the_state_rule(manager: CapsuleManager) -> None:
    seed_capsule(manager.store, 0, State.RUNNING)
    seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    seed_capsule(manager.store, 2, State.ERROR, reason="QEMU exited unexpectedly")
    seed_capsule(manager.store, 3, State.RESUMING)
    app = app_for(manager)
    async with app.run_test(size=(120, 30)) as pilot:
        assert keys(app) == {"t": True, "f": True}
        await pilot.press("j")
        assert keys(app) == {"t": True, "f": True}
        await pilot.press("j")
        assert keys(app) == {"t": False, "f": False}
        await pilot.press("j")
        assert keys(app) == {"t": False, "f": False}
        await pilot.press("t", "f")  # disabled: nothing opens
        assert isinstance(app.screen, MainScreen)

        provider = CapsuleCommands(app.screen)
        names = [name for name, _, _ in provider._commands()]
        assert "Save as template cl-test00000000" in names
        assert "Fork cl-test00000001" in names
        assert "Save as template cl-test00000002" not in names  # error state
        assert "Fork cl-test00000003" not in names  # resuming
        assert "Templates" in names


async def test_bad_template_names_and_fork_counts_are_refused_clearly(
    manager: CapsuleManager,
) -> None:
    running = seed_capsule(manager.store, 0, State.RUNNING)
    app = app_for(manager)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("t")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"Bad Name!", "enter")
        await wait_until(pilot, lambda: app.notices_of("error"))
        assert "invalid template name 'Bad Name!'" in app.notices_of("error")[0]

        await pilot.press("t")
        await pilot.press(*"default", "enter")  # the image's name
        await wait_until(pilot, lambda: len(app.notices_of("error")) == 2)
        assert "a template named 'default' exists already" in app.notices_of("error")[1]

        # A good name on a capsule whose VM is gone: the backend says why, nothing is left.
        await pilot.press("t")
        await pilot.press(*"fine-name", "enter")
        await wait_until(pilot, lambda: len(app.notices_of("error")) == 3)
        assert "its QEMU is not running" in app.notices_of("error")[2]
        assert [t.name for t in manager.list_templates() if not t.builtin] == []
        assert manager.get(running.id).state == State.RUNNING
        assert running.id not in app.operations
        assert running.id not in app.main_screen.operations

        await pilot.press("f")
        assert isinstance(app.screen, PromptScreen)
        field = app.screen.query_one(Input)
        field.value = ""
        await pilot.press(*"17", "enter")
        assert isinstance(app.screen, PromptScreen), "an out-of-range count stays in the dialog"
        assert "1 to 16" in str(app.screen.query_one("#error", Label).render())
        field.value = ""
        await pilot.press(*"zero", "enter")
        assert isinstance(app.screen, PromptScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)
        assert len(manager.list_capsules()) == 1
        await app.workers.wait_for_complete()


async def test_templates_view_lists_users_and_the_image_cannot_be_deleted(
    manager: CapsuleManager,
) -> None:
    seed_capsule(manager.store, 0, State.RUNNING)
    seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    app = app_for(manager)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("T")
        assert isinstance(app.screen, TemplatesScreen)
        screen = app.screen
        await wait_until(pilot, lambda: screen.is_mounted and screen.table.row_count > 0)
        default = next(t for t in screen.templates if t.name == "default")
        assert default.builtin and default.users == 2 and default.allocated > 0
        assert screen.table.get_cell("default", "users").plain == "2"
        assert not app.active_bindings["ctrl+d"].enabled  # an image is not deleted here
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, TemplatesScreen)
        await pilot.press("n")
        assert isinstance(app.screen, CreateScreen)
        assert app.screen.template == "default"
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, MainScreen)


@pytest.fixture
async def vm_paths(tui_paths: Paths) -> AsyncIterator[Paths]:
    try:
        yield tui_paths
    finally:
        await destroy_all(tui_paths)


@pytest.mark.vm
@pytest.mark.timeout(600)
async def test_save_start_from_fork_and_delete_on_real_capsules(vm_paths: Paths) -> None:
    app = RecordingApp(vm_paths, cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.main_screen.table
        source = await app.backend.create("default", 256, 1, "none")
        manager = app.manager
        await sh(manager, source.id, "echo kept-in-template > /root/marker")
        await wait_until(pilot, lambda: table.selected_id == source.id, timeout=20)

        await pilot.press("t")
        await pilot.press(*"web1", "enter")
        await wait_until(
            pilot,
            lambda: any("saved as template web1" in n for n in app.notices_of("information")),
            timeout=180,
        )
        assert app.notices_of("error") == []
        assert manager.get(source.id).state == State.RUNNING  # it kept running

        # the same name again: a notification, nothing changed
        await pilot.press("t")
        await pilot.press(*"web1", "enter")
        await wait_until(pilot, lambda: app.notices_of("error"), timeout=30)
        assert "a template named 'web1' exists already" in app.notices_of("error")[0]

        await pilot.press("T")
        assert isinstance(app.screen, TemplatesScreen)
        templates_view = app.screen
        await wait_until(pilot, lambda: templates_view.is_mounted)
        web1 = next(t for t in app.screen.templates if t.name == "web1")
        assert (web1.builtin, web1.source, web1.memory_mib, web1.users) == (
            False,
            source.id,
            256,
            0,
        )
        assert web1.allocated > 0
        app.screen.table.move_cursor(row=app.screen.table.get_row_index("web1"))
        await pilot.press("n")
        assert isinstance(app.screen, CreateScreen)
        assert app.screen.template == "web1"
        assert app.screen.query_one("#memory", Input).disabled  # its size is the template's
        await pilot.press("enter")
        await wait_until(pilot, lambda: len(manager.list_capsules()) == 2, timeout=30)
        made = next(c for c in manager.list_capsules() if c.id != source.id)
        await wait_until(
            pilot,
            lambda: any(made.id in n and "running" in n for n in app.notices_of("information")),
            timeout=180,
        )
        assert made.template == "web1"
        assert (await sh(manager, made.id, "cat /root/marker")).strip() == "kept-in-template"

        # back in the templates view, where the form was opened; the template is in use now:
        # deleting it is refused with the capsule named, and it stays
        screen = app.screen
        assert isinstance(screen, TemplatesScreen)
        await wait_until(
            pilot, lambda: next(t for t in screen.templates if t.name == "web1").users == 1
        )
        screen.table.move_cursor(row=screen.table.get_row_index("web1"))
        await pilot.press("ctrl+d")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await wait_until(pilot, lambda: len(app.notices_of("error")) == 2, timeout=30)
        assert "is used by 1 capsule(s)" in app.notices_of("error")[1]
        assert made.id in app.notices_of("error")[1]
        assert "web1" in [t.name for t in manager.list_templates()]
        await pilot.press("escape")

        # fork the source once from the keyboard
        table.move_cursor(row=table.get_row_index(source.id))
        await pilot.press("f")
        await pilot.press("enter")  # the default answer: 1
        await wait_until(
            pilot,
            lambda: any(n.startswith(f"{source.id} forked") for n in app.notices_of("information")),
            timeout=240,
        )
        clone = next(c for c in manager.list_capsules() if c.extra.get("fork_of") == source.id)
        assert clone.state == State.RUNNING
        assert (await sh(manager, clone.id, "cat /root/marker")).strip() == "kept-in-template"
        assert manager.get(source.id).state == State.RUNNING

        # once its capsule is gone, the template can be deleted (after asking)
        await manager.destroy(made.id)
        await pilot.press("T")
        screen = app.screen
        assert isinstance(screen, TemplatesScreen)
        await wait_until(pilot, lambda: screen.is_mounted)
        screen.table.move_cursor(row=screen.table.get_row_index("web1"))
        await pilot.press("ctrl+d", "y")
        await wait_until(
            pilot, lambda: "template web1 deleted" in app.notices_of("information"), timeout=30
        )
        assert "web1" not in [t.name for t in manager.list_templates()]
        assert "web1" not in [str(r.key.value) for r in screen.table.ordered_rows]
        assert len(app.notices_of("error")) == 2


async def test_templates_view_shows_running_builds_from_any_process(
    manager: CapsuleManager,
) -> None:
    """A build holds its work dir and writes its status (as `template build` in another
    process does): the view shows its step and latest lines, and drops it once it ends."""
    from backend.recipes.status import BuildStatus, StatusWriter

    app = app_for(manager)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("T")
        assert isinstance(app.screen, TemplatesScreen)
        screen = app.screen
        panel = screen.query_one("#builds")
        await wait_until(pilot, lambda: screen.is_mounted)
        assert not panel.display
        with manager.layout.work_dir("build") as work:
            writer = StatusWriter(work, BuildStatus("web", "/r/Recipe", 1.0, 0, 3))
            writer.progress("[2/3] line 4: RUN make", step=2)
            writer.output("compiling marker-line")
            await wait_until(pilot, lambda: panel.display, timeout=5)
            shown = str(panel.render())
            assert "building web" in shown and "step 2/3" in shown
            assert "compiling marker-line" in shown
        await wait_until(pilot, lambda: not panel.display, timeout=5)
