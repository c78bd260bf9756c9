"""The small pieces the screens are built from: sparklines, ages and the console tail."""

from __future__ import annotations

from pathlib import Path

from tui import format as fmt
from tui.console_tail import ConsoleTail
from tui.widgets.sparkline import sparkline


def test_sparkline_places_points_by_age_so_gaps_show() -> None:
    now = 1000.0
    points = [(990.0, 0.0), (991.0, 50.0), (998.0, 100.0), (1000.0, 100.0)]
    line = sparkline(points, now, width=12, ceiling=100.0)
    assert line.plain == " ▁▅      █ █"
    assert line.style == "red"  # the latest value is at the ceiling


def test_sparkline_without_recent_points_is_blank() -> None:
    assert sparkline([(900.0, 5.0)], 1000.0, width=8).plain == " " * 8


def test_age_keeps_seconds_only_while_they_matter() -> None:
    assert [fmt.age(s) for s in (42, 423, 2820, 11520, 446400)] == [
        "42s",
        "7m03s",
        "47m",
        "3h12m",
        "5d04h",
    ]


def test_console_tail_follows_appends_and_a_replaced_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    tail = ConsoleTail(log)
    assert tail.read() == (False, "")
    log.write_text("boot\r\n")
    assert tail.read() == (True, "boot\n")
    with log.open("a") as f:
        f.write("envd started\n")
    assert tail.read() == (False, "envd started\n")
    assert tail.read() == (False, "")
    # A resume renames the log away and QEMU starts a new one, here already longer.
    log.rename(tmp_path / "console.log.1")
    log.write_text("restored from snapshot, a longer first line than before\n")
    assert tail.read() == (True, "restored from snapshot, a longer first line than before\n")
