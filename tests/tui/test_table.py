"""The capsule table against real envd processes and the real sampler: live sparklines, rows
that follow the database, a cursor that follows its capsule, sorting and filtering."""

from __future__ import annotations

import pytest
from rich.text import Text
from textual.widgets import DataTable

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from backend.sampler import Sampler
from tests.hostenvd import HostEnvd
from tests.tui.fakes import FrozenSampler, sample
from tests.tui.helpers import RecordingApp, seed_capsule, wait_until
from tui import format as fmt
from tui.widgets.sparkline import BLOCKS
from tui.widgets.status_bar import StatusBar

pytestmark = pytest.mark.timeout(90)


def cell(app: RecordingApp, capsule_id: str, column: str) -> str:
    value = app.main_screen.table.get_cell(capsule_id, column)
    return value.plain if isinstance(value, Text) else str(value)


def blocks(text: str) -> int:
    return sum(ch in BLOCKS for ch in text)


def row_ids(app: RecordingApp) -> list[str]:
    return [str(row.key.value) for row in app.main_screen.table.ordered_rows]


async def test_running_rows_fill_with_live_guest_metrics(
    manager: CapsuleManager, sampler: Sampler, envd_pool: list[HostEnvd]
) -> None:
    running = seed_capsule(manager.store, 0, State.RUNNING, host_port=envd_pool[0].port)
    paused = seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    app = RecordingApp(manager=manager, sampler=sampler, accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        await wait_until(pilot, lambda: blocks(cell(app, running.id, "mem")) >= 3)
        assert blocks(cell(app, running.id, "cpu")) >= 3
        assert cell(app, running.id, "health") == "● ok"
        latest = sampler.latest(running.id)
        assert latest is not None and latest.guest_mem_used is not None
        # The memory shown is the guest's own figure, not a host-side number.
        assert fmt.size(latest.guest_mem_used) in cell(app, running.id, "mem")
        assert "rss" not in cell(app, running.id, "mem")  # no VMM process: no host figure
        assert cell(app, paused.id, "state") == "paused"
        assert blocks(cell(app, paused.id, "mem")) == 0
        assert cell(app, paused.id, "health") == fmt.UNKNOWN
        info = app.main_screen.query_one(StatusBar).info
        assert (info.running, info.paused, info.accel) == (1, 1, "tcg")
        assert info.tick_p99_ms is not None
        assert max(app.main_screen.update_ms) < 500


async def test_rows_follow_the_database_and_the_cursor_follows_its_capsule(
    manager: CapsuleManager, sampler: Sampler, envd_pool: list[HostEnvd], tui_paths: Paths
) -> None:
    for index, envd in enumerate(envd_pool):
        seed_capsule(manager.store, index, State.RUNNING, host_port=envd.port)
    app = RecordingApp(manager=manager, sampler=sampler, accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        table = app.main_screen.table
        await wait_until(pilot, lambda: table.row_count == 3)
        await pilot.press("j")
        assert table.selected_id == "cl-test00000001"

        # Another process (the CLI) writes the same database.
        cli = Store(tui_paths.database)
        try:
            older = seed_capsule(cli, 7, State.PAUSED, created_at=1_600_000_000.0)
            await wait_until(pilot, lambda: table.row_count == 4)
            assert row_ids(app)[0] == older.id
            assert table.selected_id == "cl-test00000001"
            assert table.cursor_row == 2

            cli.delete("cl-test00000000")
            await wait_until(pilot, lambda: table.row_count == 3)
            assert table.selected_id == "cl-test00000001"
        finally:
            cli.close()

        await pilot.press("M")
        assert table.selected_id == "cl-test00000001"
        assert app.main_screen.query_one(StatusBar).info.sort == "mem ↓"
        await pilot.press("M")
        assert app.main_screen.query_one(StatusBar).info.sort == "mem ↑"


async def test_sort_by_cpu_orders_rows_and_keeps_the_selection(manager: CapsuleManager) -> None:
    frozen = FrozenSampler()
    for index, cpu in enumerate((10.0, 90.0, 50.0)):
        capsule = seed_capsule(manager.store, index, State.RUNNING)
        frozen.put(sample(capsule.id, 100 + index, cpu), {"guest_cpu_pct": [cpu] * 5})
    app = RecordingApp(manager=manager, sampler=frozen, accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        table = app.main_screen.table
        assert row_ids(app) == ["cl-test00000000", "cl-test00000001", "cl-test00000002"]
        assert table.selected_id == "cl-test00000000"
        await pilot.press("C")
        assert row_ids(app) == ["cl-test00000001", "cl-test00000002", "cl-test00000000"]
        assert table.selected_id == "cl-test00000000"
        assert str(table.columns["cpu"].label) == "GUEST CPU ↓ · HOST CPU"  # type: ignore[index]
        await pilot.press("C")
        assert row_ids(app) == ["cl-test00000000", "cl-test00000002", "cl-test00000001"]

        # New numbers re-sort the rows on the next tick; the cursor stays on its capsule.
        frozen.put(sample("cl-test00000000", 100, 95.0))
        frozen.emit()
        await pilot.pause()
        assert row_ids(app) == ["cl-test00000002", "cl-test00000001", "cl-test00000000"]
        assert table.selected_id == "cl-test00000000"


async def test_filter_narrows_the_rows_and_escape_restores_them(
    manager: CapsuleManager,
) -> None:
    seed_capsule(manager.store, 0, State.RUNNING)
    seed_capsule(manager.store, 1, State.PAUSED, generation=1)
    seed_capsule(manager.store, 2, State.PAUSED, generation=1)
    app = RecordingApp(manager=manager, sampler=FrozenSampler(), accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        await pilot.press("slash", *"paused")
        assert row_ids(app) == ["cl-test00000001", "cl-test00000002"]
        assert app.main_screen.query_one(StatusBar).info.filter == "paused"
        await pilot.press("enter")
        assert app.focused is app.main_screen.table
        assert app.active_bindings["r"].enabled  # the filtered selection is a paused capsule
        await pilot.press("escape")
        assert len(row_ids(app)) == 3
        assert app.main_screen.query_one(StatusBar).info.filter == ""


async def test_painted_rows_follow_new_figures(manager: CapsuleManager) -> None:
    frozen = FrozenSampler()
    capsule = seed_capsule(manager.store, 0, State.RUNNING)
    frozen.put(sample(capsule.id, 100, 12.0))
    app = RecordingApp(manager=manager, sampler=frozen, accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        table = app.main_screen.table

        def painted() -> str:
            return table.render_line(1).text  # line 0 is the header

        assert " 12%" in painted() and "100M/240M" in painted()
        frozen.now += 1
        frozen.put(sample(capsule.id, 150, 87.0, ts=frozen.now))
        frozen.emit()
        await pilot.pause()
        assert " 87%" in painted() and "150M/240M" in painted()
        assert " 12%" not in painted()


async def test_the_fast_cell_path_paints_what_datatable_would(manager: CapsuleManager) -> None:
    """CapsuleTable renders its one-line Text cells without Rich's layout machinery; every
    cell it can take must come out segment for segment as DataTable's own render: plain and
    styled cells, spans, zebra rows, the cursor row, hover, and the fallback for a cell
    wider than its column."""
    frozen = FrozenSampler()
    running = seed_capsule(manager.store, 0, State.RUNNING)
    seed_capsule(manager.store, 1, State.PAUSED, generation=2)
    broken = seed_capsule(manager.store, 2, State.ERROR)
    manager.store.put(broken.with_(reason="qemu exited: [bold]signal 9[/] " + "x" * 40))
    frozen.put(sample(running.id, 100, 42.0), {"guest_cpu_pct": [5, 50, 90, 20]})
    app = RecordingApp(manager=manager, sampler=frozen, accel="tcg", cursor_blink=False)
    async with app.run_test(size=(200, 30)) as pilot:
        await pilot.pause()
        table = app.main_screen.table
        fast = 0
        for row_index in range(table.row_count):
            base = table._get_row_style(row_index, table.rich_style)
            capsule_id = str(table.ordered_rows[row_index].key.value)
            for column_index, column in enumerate(table.ordered_columns):
                width = column.get_render_width(table)
                value = table.get_cell(capsule_id, column.key)
                for cursor, hover in ((False, False), (True, False), (False, True)):
                    expected = DataTable._render_cell(
                        table, row_index, column_index, base, width, cursor, hover
                    )
                    line = table._render_text_line(
                        value, row_index, column_index, base, width, cursor, hover
                    )
                    if line is None:
                        assert value.cell_len > width - 2 * table.cell_padding
                        continue
                    fast += 1
                    assert [line] == expected, (capsule_id, column.key, cursor, hover)
                    assert (
                        table._render_cell(row_index, column_index, base, width, cursor, hover)
                        == expected
                    )
        assert fast >= 3 * 3 * 8  # the fast path took nearly every cell
