"""`enter` on a capsule: its memory and CPU over time, balloon, snapshots, events and console."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, cast

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Label, Log, Static, Tab, Tabs

from backend.capsules.errors import CapsuleNotFound
from backend.capsules.models import Capsule, Event, Snapshot, State
from backend.sampler import RANGES, BalloonStats, Tick
from tui import format as fmt
from tui.console_tail import ConsoleTail
from tui.host import capsule_costs
from tui.widgets.capsule_table import STATE_STYLES
from tui.widgets.metric_chart import MetricChart, Series

if TYPE_CHECKING:
    from tui.context import Dashboard

log = logging.getLogger("wrenn.tui")

WINDOWS = ("5m", "1h", "24h")
CONSOLE_LINES = 500
EVENT_LIMIT = 50
MIB = float(1 << 20)


def _to_mib(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    return [(ts, value / MIB) for ts, value in points]


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


class DetailScreen(Screen[None]):
    CSS_PATH = "detail.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("1", "window('5m')", "5 min"),
        Binding("2", "window('1h')", "1 hour"),
        Binding("3", "window('24h')", "24 hours"),
    ]

    class Ticked(Message):
        pass

    def __init__(self, capsule_id: str) -> None:
        super().__init__()
        self.capsule_id = capsule_id
        self.window = WINDOWS[0]
        self.console = ConsoleTail(Path())
        self._shown_events: tuple[Event, ...] = ()
        self._shown_snapshots: tuple[Snapshot, ...] = ()
        self._tick_pending = False
        self._last_error = ""
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def wrenn(self) -> Dashboard:
        return cast("Dashboard", self.app)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="summary")
        yield Tabs(*(Tab(name, id=f"window-{name}") for name in WINDOWS), id="windows")
        with Horizontal(id="charts"):
            yield MetricChart("Memory", "MiB", id="mem-chart")
            yield MetricChart("CPU", "%", id="cpu-chart")
        with Horizontal(id="panes"):
            with Vertical(id="left"):
                yield Label("Balloon", classes="pane-title")
                yield Static(id="balloon")
                yield Label("Snapshots", classes="pane-title")
                yield DataTable(id="snapshots", cursor_type="none")
            with Vertical(id="middle"):
                yield Label("Events", classes="pane-title")
                yield DataTable(id="events", cursor_type="none")
            with Vertical(id="right"):
                yield Label("Console", classes="pane-title")
                yield Log(id="console", max_lines=CONSOLE_LINES)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = self.capsule_id
        self.console = ConsoleTail(self.wrenn.backend.console_log(self.capsule_id))
        self.query_one("#snapshots", DataTable).add_columns(
            "gen", "memory", "disk", "total", "pause", "taken"
        )
        self.query_one("#events", DataTable).add_columns("time", "kind", "message")
        self._unsubscribe = self.wrenn.sampler.subscribe(self._on_tick)
        self.refresh_all()

    def on_unmount(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_tick(self, _tick: Tick) -> None:
        if not self._tick_pending:
            self._tick_pending = True
            self.post_message(self.Ticked())

    def on_detail_screen_ticked(self, _: Ticked) -> None:
        self._tick_pending = False
        self.refresh_all()

    def refresh_all(self) -> None:
        try:
            capsule = self.wrenn.backend.get(self.capsule_id)
        except CapsuleNotFound:
            self.notify(f"{self.capsule_id} no longer exists", severity="warning")
            self.dismiss()
            return
        try:
            self._show(capsule)
        except Exception as exc:
            # A failed read leaves the last figures up; the next tick tries again.
            log.exception("updating the details of %s failed", self.capsule_id)
            message = f"cannot update the details: {exc}"
            if message != self._last_error:
                self._last_error = message
                self.notify(message, severity="error", markup=False)

    def _show(self, capsule: Capsule) -> None:
        self._show_summary(capsule)
        self._show_charts(capsule)
        self._show_balloon(capsule)
        self._show_snapshots()
        self._show_events()
        self._show_console()

    def _show_summary(self, capsule: Capsule) -> None:
        text = Text()
        text.append(capsule.id, style="bold")
        text.append("  ")
        text.append(capsule.state.value, style=STATE_STYLES[capsule.state])
        text.append(f"  {capsule.template}  {capsule.vcpus} vCPU  {fmt.mib(capsule.memory_mib)}")
        network = "isolated" if capsule.network == "none" else capsule.network
        text.append(f"  {capsule.accel.upper()}  network {network}  envd :{capsule.host_port}")
        if capsule.state == State.RUNNING and capsule.started_at is not None:
            text.append(f"  up {fmt.duration(self.wrenn.clock() - capsule.started_at)}")
        cost = capsule_costs(self.wrenn.backend, self.wrenn.sampler).get(capsule.id)
        if cost is not None:
            text.append("\nhost memory ", style="dim")
            text.append(fmt.size(cost.total), style="bold")
            if cost.sharing:
                text.append(
                    f" = {fmt.size(cost.own)} its own + {fmt.size(cost.template_share)} share of "
                    f"the template's {fmt.size(cost.template)} ({cost.sharing} running)",
                    style="dim",
                )
            else:
                text.append(
                    f" = {fmt.size(cost.own)} QEMU + {fmt.size(cost.ram_file)} RAM file",
                    style="dim",
                )
        if capsule.reason:
            text.append(f"\n{capsule.reason}", style="red")
        self.query_one("#summary", Static).update(text)

    def _show_charts(self, capsule: Capsule) -> None:
        sampler = self.wrenn.sampler
        window_s = float(RANGES[self.window])
        now = self.wrenn.clock()

        def history(series: str) -> list[tuple[float, float]]:
            return list(sampler.history(self.capsule_id, series, window_s))

        memory = [
            Series("guest used", _to_mib(history("guest_mem_used")), "green"),
            Series("guest cache", _to_mib(history("guest_mem_cache")), "blue"),
            Series("QEMU RSS", _to_mib(history("host_rss")), "orange"),
        ]
        top_mem = max([capsule.memory_mib, *(v for s in memory for _, v in s.points)])
        self.query_one("#mem-chart", MetricChart).plot(memory, now, window_s, top_mem * 1.05)
        cpu = [
            Series("guest", history("guest_cpu_pct"), "green"),
            Series("host (QEMU)", history("host_cpu_pct"), "orange"),
        ]
        top_cpu = max([100.0, *(v for s in cpu for _, v in s.points)])
        self.query_one("#cpu-chart", MetricChart).plot(cpu, now, window_s, top_cpu)

    def _show_balloon(self, capsule: Capsule) -> None:
        stats: BalloonStats | None = None
        if capsule.state == State.RUNNING:
            stats = self.wrenn.sampler.balloon(self.capsule_id)
        if stats is None:
            self.query_one("#balloon", Static).update(Text("no balloon statistics", style="dim"))
            return
        rows = (
            ("actual", stats.actual),
            ("total", stats.total),
            ("free", stats.free),
            ("available", stats.available),
            ("disk caches", stats.disk_caches),
        )
        text = Text()
        for name, value in rows:
            text.append(f"{name:<12}", style="dim")
            text.append(f"{fmt.size(value)}\n")
        text.rstrip()
        self.query_one("#balloon", Static).update(text)

    def _show_snapshots(self) -> None:
        snapshots = tuple(self.wrenn.backend.snapshots(self.capsule_id))
        if snapshots == self._shown_snapshots:
            return
        self._shown_snapshots = snapshots
        table = self.query_one("#snapshots", DataTable)
        table.clear()
        for s in reversed(snapshots):
            table.add_row(
                str(s.generation),
                # RAM file and device state together: a clone's pause has no RAM file, its
                # memory is a diff on its template inside the state file
                fmt.size(s.ram_allocated + s.state_size),
                fmt.size(s.disk_allocated),
                Text(fmt.size(s.total_allocated), style="bold"),
                f"{s.pause_seconds:.1f}s",
                _clock(s.created_at),
            )

    def _show_events(self) -> None:
        events = tuple(self.wrenn.backend.events(self.capsule_id, EVENT_LIMIT))
        if events == self._shown_events:
            return
        self._shown_events = events
        table = self.query_one("#events", DataTable)
        table.clear()
        for event in reversed(events):
            style = "red" if event.kind == "error" else ""
            table.add_row(_clock(event.ts), Text(event.kind, style=style), Text(event.message))

    def _show_console(self) -> None:
        restarted, text = self.console.read()
        log = self.query_one("#console", Log)
        if restarted:
            log.clear()
        if text:
            log.write(text)

    # -- keys -------------------------------------------------------------------------------

    def action_window(self, window: str) -> None:
        self.query_one("#windows", Tabs).active = f"window-{window}"

    @on(Tabs.TabActivated, "#windows")
    def _window_changed(self, event: Tabs.TabActivated) -> None:
        window = str(event.tab.id).removeprefix("window-")
        if window != self.window:
            self.window = window
            self.refresh_all()

    def action_back(self) -> None:
        self.dismiss()
