"""The capsule table fits the window: what gives way in which order, values never cut, and a
resize that keeps the selection and the sort."""

from __future__ import annotations

import pytest
from rich.text import Text

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from tests.tui.fakes import FROZEN_NOW, FrozenSampler, sample
from tests.tui.helpers import RecordingApp, seed_capsule, wait_until
from tui.widgets.capsule_table import (
    CELL_PAD,
    GIVE_WAY,
    SPARK_MAX,
    SPARK_MIN,
    fit,
    short_ids,
)
from tui.widgets.sparkline import BLOCKS

pytestmark = pytest.mark.timeout(60)
ALWAYS = ("id", "state", "mem", "cpu")


def width_of(layout_columns: tuple[object, ...]) -> int:
    return sum(spec.width + CELL_PAD for spec in layout_columns)  # type: ignore[attr-defined]


@pytest.mark.parametrize("width", [78, 100, 118, 140, 160, 198, 300])
def test_layout_fits_and_keeps_the_four_columns(width: int) -> None:
    layout = fit(width, 7)
    assert set(ALWAYS) <= set(layout.keys)
    assert width_of(layout.columns) <= width
    assert SPARK_MIN <= layout.spark <= SPARK_MAX


def test_below_80_columns_the_sparklines_shrink_last() -> None:
    layout = fit(60, 7)
    assert set(layout.keys) == set(ALWAYS)
    assert width_of(layout.columns) <= 60
    assert 4 <= layout.spark < SPARK_MIN


def test_columns_give_way_in_the_written_order() -> None:
    seen: list[str] = []
    previous = fit(400, 7)
    assert not previous.short_ids and previous.host_figures
    for width in range(400, 40, -1):
        layout = fit(width, 7)
        gone = set(previous.keys) - set(layout.keys)
        seen += sorted(gone)
        if layout.short_ids and not previous.short_ids:
            seen.append("id")
        if previous.host_figures and not layout.host_figures:
            seen.append("host")
        assert set(layout.keys) <= set(previous.keys), "a column came back while narrowing"
        previous = layout
    assert seen == list(GIVE_WAY)
    assert set(previous.keys) == set(ALWAYS)


def test_sparklines_grow_with_the_window() -> None:
    assert fit(120, 7).spark < fit(200, 7).spark < fit(300, 7).spark


def test_short_ids_are_unique_prefixes() -> None:
    ids = ["cl-abcdef123456", "cl-abcdef999999", "cl-zz0000000000"]
    short = short_ids(ids)
    assert short == {ids[0]: "abcdef1", ids[1]: "abcdef9", ids[2]: "zz00000"}
    assert short_ids(["cl-aaaaaaaaaaaa"]) == {"cl-aaaaaaaaaaaa": "aaaaaa"}


async def test_80x24_shows_both_sparklines_with_values_and_resizing_keeps_selection(
    manager: CapsuleManager,
) -> None:
    frozen = FrozenSampler()
    ids = []
    for index, (mem, cpu) in enumerate([(118, 12.0), (420, 97.0), (60, 3.0)]):
        capsule = seed_capsule(manager.store, index, State.RUNNING, started_at=FROZEN_NOW - 600)
        ids.append(capsule.id)
        frozen.put(
            sample(capsule.id, mem, cpu),
            {"guest_mem_used": [mem * 2**20] * 200, "guest_cpu_pct": [cpu] * 200},
        )
    app = RecordingApp(
        manager=manager, sampler=frozen, clock=lambda: FROZEN_NOW, accel="tcg", cursor_blink=False
    )
    async with app.run_test(size=(200, 30)) as pilot:
        table = app.main_screen.table
        await wait_until(pilot, lambda: table.row_count == 3)
        await pilot.press("M")  # memory, largest first; the cursor stays on its capsule
        selected = table.selected_id
        assert selected == ids[0]
        wide = table.layout_now
        await pilot.resize_terminal(80, 24)
        await wait_until(pilot, lambda: table.layout_now != wide)
        await pilot.pause(0.1)
        narrow = table.layout_now
        assert narrow.short_ids and set(narrow.keys) < set(wide.keys)
        assert narrow.spark < wide.spark
        assert table.selected_id == selected
        assert [str(r.key.value) for r in table.ordered_rows] == [ids[1], ids[0], ids[2]]
        assert table.row_sort.label == "mem ↓"
        for spec in narrow.columns:
            for capsule_id in ids:
                value = table.get_cell(capsule_id, spec.key)
                assert isinstance(value, Text)
                assert value.cell_len <= spec.width, (spec.key, value.plain)
        for capsule_id, mem_text, cpu_text in zip(
            ids, ("118M/240M", "420M/240M", "60.0M/240M"), ("12%", "97%", "3%"), strict=True
        ):
            mem_cell = table.get_cell(capsule_id, "mem").plain
            cpu_cell = table.get_cell(capsule_id, "cpu").plain
            assert sum(ch in BLOCKS for ch in mem_cell) == narrow.spark
            assert mem_cell.endswith(mem_text) and cpu_cell.strip().endswith(cpu_text)
        # the screen shows it: the widest row still ends inside 80 columns
        assert table.virtual_size.width <= table.size.width
        await pilot.resize_terminal(200, 30)
        await wait_until(pilot, lambda: table.layout_now == wide)
        assert table.selected_id == selected
