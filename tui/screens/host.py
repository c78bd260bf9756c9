"""`H`: the host at a glance. Memory (what the capsules cost, what is left, how many more fit),
CPU (the host's load and this dashboard's own cost), disk (what capsule disks, snapshots,
templates, images and caches take, and what could be freed, with `F` to free it after asking).
The app measures (in a worker) and hands the figures down; the screen only draws them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from backend.dashboard import DiskUsage
from backend.sampler import SamplerStats
from tui import format as fmt
from tui.host import Capacity, HostTotals
from tui.messages import FreeSpaceRequested, HelpRequested, HostRefreshWanted

REFRESH_S = 5.0
KIND_LABELS = {
    "ram": "orphan RAM files",
    "tmp-snapshot": "half-written snapshots",
    "work": "abandoned work dirs",
}


@dataclass(frozen=True)
class HostReport:
    host: HostTotals
    room: Capacity
    running: int
    default_mib: int
    usage: DiskUsage | None
    sampler: SamplerStats | None = None


def _section(title: str, rows: list[tuple[str, Text | str]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(width=26, no_wrap=True)
    table.add_column()
    table.add_row(Text(title, style="bold underline"), "")
    for label, value in rows:
        table.add_row(Text(label, style="dim"), value)
    return table


def memory_rows(report: HostReport) -> list[tuple[str, Text | str]]:
    host, room = report.host, report.room
    fits = Text(f"{room.fits}", style="bold" if room.fits else "bold red")
    fits.append(f" more of {fmt.mib(report.default_mib)}")
    return [
        ("capsules cost the host", Text(f"{fmt.size(room.capsules_cost)}", style="bold")),
        ("", f"QEMU RSS of {report.running} running"),
        ("host has left", Text(f"{fmt.size(host.available)} of {fmt.size(host.mem_total)}")),
        ("room for", fits),
        ("", f"at {fmt.size(room.per_capsule)} each: {room.basis}"),
    ]


def cpu_rows(report: HostReport) -> list[tuple[str, Text | str]]:
    host = report.host
    load = "" if host.load_1m is None else f", load {host.load_1m:.2f}"
    rows: list[tuple[str, Text | str]] = [
        ("host", Text(f"{fmt.percent(host.cpu_pct)}{load}", style="bold"))
    ]
    agent = fmt.percent(host.agent_cpu_pct)
    rows.append(("dashboard + sampler", f"{agent} of one core"))
    if report.sampler is not None and report.sampler.ticks:
        stats = report.sampler
        rows.append(
            (
                "sampler",
                f"tick p99 {stats.tick_p99_ms:.0f} ms, {stats.requests_per_s:.0f} requests/s",
            )
        )
    return rows


def disk_rows(report: HostReport) -> list[tuple[str, Text | str]]:
    usage = report.usage
    if usage is None:
        return [("", "measuring…")]
    rows: list[tuple[str, Text | str]] = [
        (label, Text(fmt.size(size), style="bold")) for label, size in usage.used.items()
    ]
    rows.append(("free (state dir)", Text(fmt.size(usage.free))))
    kinds: dict[str, tuple[int, int]] = {}
    for item in usage.reclaimable:
        count, size = kinds.get(item.kind, (0, 0))
        kinds[item.kind] = (count + 1, size + item.size)
    if not kinds:
        rows.append(("can be freed", Text("nothing", style="green")))
    for kind, (count, size) in kinds.items():
        rows.append(
            (f"can be freed: {KIND_LABELS.get(kind, kind)}", Text(f"{fmt.size(size)} ({count})"))
        )
    return rows


class HostScreen(Screen[None]):
    CSS_PATH = "host.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,H", "app.pop_screen", "Back"),
        Binding("F", "free", "Free space", key_display="F"),
        Binding("g", "refresh", "Measure again"),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.report: HostReport | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="host"):
            yield Static("measuring…", id="memory")
            yield Static("", id="cpu")
            yield Static("", id="disk")
        yield Footer()

    def on_mount(self) -> None:
        self.post_message(HostRefreshWanted())
        self.set_interval(REFRESH_S, lambda: self.post_message(HostRefreshWanted()))

    def show(self, report: HostReport) -> None:
        self.report = report
        self.query_one("#memory", Static).update(_section("Memory", memory_rows(report)))
        self.query_one("#cpu", Static).update(_section("CPU", cpu_rows(report)))
        self.query_one("#disk", Static).update(_section("Disk", disk_rows(report)))
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "free":
            usage = self.report.usage if self.report is not None else None
            return True if usage is not None and usage.reclaimable else None
        return True

    def action_free(self) -> None:
        self.post_message(FreeSpaceRequested())

    def action_refresh(self) -> None:
        self.post_message(HostRefreshWanted())

    def action_help(self) -> None:
        self.post_message(HelpRequested())
