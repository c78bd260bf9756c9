"""The main screen: every capsule with its health and live sparklines, and the keys to drive them.

Data flow: the sampler calls back once a second; the callback only queues the tick and posts a
message, so the sampler's own clock never waits on drawing. A UI that falls behind still feeds
every tick's samples to the sparklines but draws once. The handler reads the capsule list (the
CLI changes the database too; the store answers from memory unless the database moved), gathers
each row's numbers and hands them to the table.

State comes down from the app as messages (tui/messages.py): a capsule record the manager just
saved replaces its row at once without reading the store, and the operations the app has in
flight (`OperationChanged`) are this screen's own copy, not a read of the app's.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, cast

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, TabbedContent, TabPane

from backend.capsules.actions import TRANSITIONAL, Action, allowed
from backend.capsules.models import Capsule, State
from backend.sampler import Tick
from tui import messages as msg
from tui.host import capacity, capsule_costs
from tui.terminal import TerminalPane, session_tag
from tui.terminal.attach import AttachError, attach_fullscreen
from tui.widgets.capsule_table import SPARK_MAX, CapsuleTable, CapsuleView, SortMode
from tui.widgets.sparkline import SparkHistory
from tui.widgets.status_bar import StatusBar, StatusInfo

if TYPE_CHECKING:
    from tui.context import Dashboard

log = logging.getLogger("wrenn.tui")

STALL_AFTER_S = 3.0
"""No tick for this long: the status line says the sampler has stalled."""
UPDATE_HISTORY = 600
SPARK_SERIES = ("guest_mem_used", "guest_cpu_pct")


class MainScreen(Screen[None]):
    CSS_PATH = "main.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "create", "New"),
        Binding("p", "pause", "Pause"),
        Binding("r", "resume", "Resume"),
        Binding("ctrl+d", "destroy", "Destroy"),
        Binding("t", "template", "Template"),
        Binding("f", "fork", "Fork"),
        Binding("T", "templates", "Templates", key_display="T"),
        Binding("H", "host", "Host", key_display="H"),
        Binding("s", "shell", "Shell"),
        Binding("A", "attach", "Attach", key_display="A"),
        Binding("x", "close_shell", "Close shell"),
        Binding("slash", "filter", "Filter"),
        Binding("C", "sort('cpu')", "Sort CPU", key_display="C"),
        Binding("M", "sort('mem')", "Sort mem", key_display="M"),
        Binding("escape", "clear_filter", "Clear filter"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("q", "app.quit", "Quit"),
    ]

    class Ticked(Message):
        """The sampler produced ticks (waiting in `MainScreen.pending_ticks`)."""

    class Redraw(Message):
        """Draw the rows again soon (several changes in a row draw once)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending_ticks: list[Tick] = []
        self.sparks = SparkHistory(SPARK_SERIES, SPARK_MAX)
        self.last_tick: Tick | None = None
        self.last_tick_at = time.monotonic()
        self.filter_text = ""
        self.update_ms: deque[float] = deque(maxlen=UPDATE_HISTORY)
        """Milliseconds each table update took (the benchmark reads them)."""
        self._snapshot_sizes: dict[tuple[str, int], int | None] = {}
        self._binding_state: tuple[object, ...] = ()
        self._last_error = ""
        self._redraw_pending = False
        self._reread = False
        self.capsules: list[Capsule] = []
        """What the rows show, in the store's order: read from the store, patched in place by
        the records the app passes down."""
        self.operations: dict[str, str] = {}
        """Capsule id -> the operation the app has in flight on it (from OperationChanged)."""
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def wrenn(self) -> Dashboard:
        return cast("Dashboard", self.app)

    @property
    def table(self) -> CapsuleTable:
        return self.query_one(CapsuleTable)

    def compose(self) -> ComposeResult:
        yield Header()
        yield StatusBar(id="status")
        yield Input(placeholder="filter by id, state or template", id="filter")
        # Shell panes go below the table, one tab per capsule.
        with Vertical(id="workspace"):
            yield CapsuleTable(id="capsules")
            yield TabbedContent(id="shells")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#filter", Input).cursor_blink = self.wrenn.cursor_blink
        self._unsubscribe = self.wrenn.sampler.subscribe(self._on_tick)
        self.table.focus()
        self.refresh_rows()
        self.set_interval(1.0, self._watch_sampler)

    def on_unmount(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # -- data -------------------------------------------------------------------------------

    def _on_tick(self, tick: Tick) -> None:
        self.pending_ticks.append(tick)
        if len(self.pending_ticks) == 1:
            self.post_message(self.Ticked())

    def on_main_screen_ticked(self, _: Ticked) -> None:
        ticks, self.pending_ticks = self.pending_ticks, []
        if not ticks:
            return
        for tick in ticks:
            for capsule_id, sample in tick.samples.items():
                figures = {
                    "guest_mem_used": sample.guest_mem_used,
                    "guest_cpu_pct": sample.guest_cpu_pct,
                }
                self.sparks.add(capsule_id, sample.ts, figures)
        self.last_tick = ticks[-1]
        self.last_tick_at = time.monotonic()
        self.refresh_rows()

    def on_capsule_changed(self, message: msg.CapsuleChanged) -> None:
        capsule = message.capsule
        for i, known in enumerate(self.capsules):
            if known.id == capsule.id:
                self.capsules[i] = capsule
                break
        else:
            self._reread = True  # a new one: its place in the list is the store's
        self._redraw_soon()

    def on_capsules_stale(self, _: msg.CapsulesStale) -> None:
        self._reread = True
        self._redraw_soon()

    def on_operation_changed(self, message: msg.OperationChanged) -> None:
        if message.operation is None:
            self.operations.pop(message.capsule_id, None)
            self._reread = True  # a destroy is said by no record
        else:
            self.operations[message.capsule_id] = message.operation
        self._redraw_soon()

    def _redraw_soon(self) -> None:
        """A burst of changes (a create saves several records) draws once."""
        if not self._redraw_pending:
            self._redraw_pending = True
            self.post_message(self.Redraw())

    def on_main_screen_redraw(self, _: Redraw) -> None:
        self._redraw_pending = False
        reread, self._reread = self._reread, False
        self.refresh_rows(reread)

    def _watch_sampler(self) -> None:
        if time.monotonic() - self.last_tick_at > STALL_AFTER_S:
            self.refresh_rows()

    def refresh_rows(self, reread: bool = True) -> None:
        """Redraw the rows and the status line, reading the capsule list first unless
        `reread` is False (the rows already hold every record the app passed down)."""
        try:
            if reread:
                self.capsules = self.wrenn.backend.list_capsules()
            self._refresh_rows()
        except Exception as exc:
            # One bad read (a locked or half-migrated database) must not take the dashboard
            # down; the next tick tries again. Say it once, not every second.
            log.exception("updating the capsule table failed")
            message = f"cannot update the capsule table: {exc}"
            if message != self._last_error:
                self._last_error = message
                self.notify(message, severity="error", markup=False)
        else:
            self._last_error = ""

    def _refresh_rows(self) -> None:
        started = time.perf_counter()
        app = self.wrenn
        capsules = self.capsules
        tick = self.last_tick
        now = tick.ts if tick is not None else app.clock()
        views = [self._view(capsule) for capsule in capsules if self._matches(capsule)]
        present = {capsule.id for capsule in capsules}
        self.sparks.keep(present)
        if len(self._snapshot_sizes) > 2 * len(present):
            self._snapshot_sizes = {
                key: size for key, size in self._snapshot_sizes.items() if key[0] in present
            }
        self.table.show(views, now)
        self._sync_shells({capsule.id: capsule for capsule in capsules})
        self._show_status(capsules)
        self._refresh_bindings_if_needed()
        self.update_ms.append((time.perf_counter() - started) * 1000)

    def _view(self, capsule: Capsule) -> CapsuleView:
        sampler = self.wrenn.sampler
        if capsule.id not in self.sparks:
            self.sparks.seed(
                capsule.id,
                {name: sampler.history(capsule.id, name, SPARK_MAX) for name in SPARK_SERIES},
            )
        running = capsule.state == State.RUNNING
        return CapsuleView(
            capsule=capsule,
            sample=sampler.latest(capsule.id) if running else None,
            mem_history=self.sparks.points(capsule.id, "guest_mem_used"),
            cpu_history=self.sparks.points(capsule.id, "guest_cpu_pct"),
            snapshot_bytes=self._snapshot_size(capsule),
            operation=self.operations.get(capsule.id),
        )

    def _snapshot_size(self, capsule: Capsule) -> int | None:
        if capsule.generation == 0:
            return None
        key = (capsule.id, capsule.generation)
        if key not in self._snapshot_sizes:
            sizes = {
                s.generation: s.total_allocated for s in self.wrenn.backend.snapshots(capsule.id)
            }
            self._snapshot_sizes[key] = sizes.get(capsule.generation)
        return self._snapshot_sizes[key]

    def _matches(self, capsule: Capsule) -> bool:
        needle = self.filter_text.lower()
        if not needle:
            return True
        return any(needle in field for field in (capsule.id, capsule.state.value, capsule.template))

    def _show_status(self, capsules: list[Capsule]) -> None:
        app = self.wrenn
        states = [c.state for c in capsules]
        stats = self.last_tick.stats if self.last_tick is not None else app.sampler.stats
        host = app.host_probe()
        room = capacity(
            host,
            (cost.total for cost in capsule_costs(app.backend, app.sampler).values()),
            app.backend.default_memory_mib,
        )
        self.query_one(StatusBar).show(
            StatusInfo(
                running=states.count(State.RUNNING),
                paused=states.count(State.PAUSED),
                busy=sum(states.count(s) for s in TRANSITIONAL),
                failed=states.count(State.ERROR),
                host=host,
                fits=room.fits,
                warnings=room.warnings,
                tick_p99_ms=stats.tick_p99_ms if stats.ticks else None,
                accel=app.accel,
                sort=self.table.row_sort.label,
                filter=self.filter_text,
                sampler_stalled=self.last_tick is not None
                and time.monotonic() - self.last_tick_at > STALL_AFTER_S,
            )
        )

    # -- which keys apply -------------------------------------------------------------------

    def selected_view(self) -> CapsuleView | None:
        selected = self.table.selected_id
        return self.table.view(selected) if selected else None

    def _refresh_bindings_if_needed(self) -> None:
        # The Footer rebuilds itself on every refresh_bindings(), so only ask when what the
        # keys can do changed, not merely which capsule is selected.
        view = self.selected_view()
        state: tuple[object, ...] = (
            (view.capsule.state, view.operation) if view else None,
            self.filter_text != "" or self.query_one("#filter", Input).display,
        )
        if state != self._binding_state:
            self._binding_state = state
            self.refresh_bindings()

    @on(DataTable.RowHighlighted)
    def _selection_moved(self) -> None:
        self._refresh_bindings_if_needed()

    @on(DataTable.RowSelected)
    def _row_clicked(self) -> None:
        self.action_details()

    KEY_ACTIONS: ClassVar[dict[str, Action]] = {
        "pause": Action.PAUSE,
        "resume": Action.RESUME,
        "destroy": Action.DESTROY,
        "shell": Action.EXEC,
        "attach": Action.EXEC,
        "template": Action.TEMPLATE,
        "fork": Action.FORK,
    }
    """Keys that act on the selected capsule, and the operation each is (its state decides,
    by the one rule in backend/capsules/actions.py, whether the key is enabled)."""

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "clear_filter":
            return bool(self._binding_state and self._binding_state[1])
        if action == "close_shell":
            return True if self._shell_panes() else None
        if action == "details":
            return True if self.selected_view() is not None else None
        operation = self.KEY_ACTIONS.get(action)
        if operation is None:
            return True
        view = self.selected_view()
        if view is None or view.operation is not None:
            return None
        return True if allowed(view.capsule.state, operation) else None

    # -- actions ----------------------------------------------------------------------------

    def action_create(self) -> None:
        self.post_message(msg.CreateRequested())

    def _request(self, request: type[msg.CapsuleRequest]) -> None:
        if (view := self.selected_view()) is not None:
            self.post_message(request(view.capsule.id))

    def action_pause(self) -> None:
        self._request(msg.PauseRequested)

    def action_resume(self) -> None:
        self._request(msg.ResumeRequested)

    def action_destroy(self) -> None:
        self._request(msg.DestroyRequested)

    def action_details(self) -> None:
        self._request(msg.DetailsRequested)

    def action_template(self) -> None:
        self._request(msg.TemplateRequested)

    def action_fork(self) -> None:
        self._request(msg.ForkRequested)

    def action_templates(self) -> None:
        self.post_message(msg.TemplatesRequested())

    def action_host(self) -> None:
        self.post_message(msg.HostRequested())

    def action_sort(self, mode: str) -> None:
        table = self.table
        table.set_sort(table.row_sort.toggled(SortMode(mode)))
        self.refresh_rows(reread=False)

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        # At once, not after the queued messages (focus() waits for them): a key typed right
        # after `/` belongs to the filter, not to the table's bindings.
        self.set_focus(field)
        self._refresh_bindings_if_needed()

    def action_clear_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.value = ""
        field.display = False
        self.filter_text = ""
        self.table.focus()
        self.refresh_rows(reread=False)

    @on(Input.Changed, "#filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value.strip()
        self.refresh_rows(reread=False)

    @on(Input.Submitted, "#filter")
    def _filter_submitted(self) -> None:
        if not self.filter_text:
            self.query_one("#filter", Input).display = False
        self.table.focus()
        self._refresh_bindings_if_needed()

    def action_help(self) -> None:
        self.post_message(msg.HelpRequested())

    # -- shells -----------------------------------------------------------------------------

    def _shell_panes(self) -> list[TerminalPane]:
        return list(self.query(TerminalPane))

    def _shell_pane(self, capsule_id: str) -> TerminalPane | None:
        return next((p for p in self._shell_panes() if p.capsule_id == capsule_id), None)

    def _sync_shells(self, capsules: dict[str, Capsule]) -> None:
        """Panes follow their capsule: paused while it is, gone when it is destroyed."""
        tabs = self.query_one("#shells", TabbedContent)
        for pane in self._shell_panes():
            capsule = capsules.get(pane.capsule_id)
            if capsule is None:
                tabs.remove_pane(f"shell-{pane.capsule_id}")
            else:
                pane.set_paused(capsule.state != State.RUNNING)
        if not tabs.tab_count:
            tabs.display = False

    async def action_shell(self) -> None:
        view = self.selected_view()
        if view is None:
            return
        capsule = view.capsule
        tabs = self.query_one("#shells", TabbedContent)
        tabs.display = True
        pane = self._shell_pane(capsule.id)
        if pane is None:
            pane = TerminalPane(capsule.id, capsule.envd_url, capsule.access_token)
            await tabs.add_pane(TabPane(capsule.id, pane, id=f"shell-{capsule.id}"))
        tabs.active = f"shell-{capsule.id}"
        pane.set_paused(capsule.state != State.RUNNING)
        pane.focus()
        self.wrenn.backend.touch(capsule.id)
        self.refresh_bindings()

    async def action_attach(self) -> None:
        view = self.selected_view()
        if view is None:
            return
        capsule = view.capsule
        self.wrenn.backend.touch(capsule.id)
        pane = self._shell_pane(capsule.id)
        if pane is not None:
            # the pane lets go of its socket while the real terminal drives the session
            await pane.attach_fullscreen()
            return
        try:
            with self.app.suspend():
                attach_fullscreen(capsule.envd_url, capsule.access_token, session_tag(capsule.id))
        except AttachError as exc:
            self.notify(str(exc), severity="error", markup=False)

    async def action_close_shell(self) -> None:
        tabs = self.query_one("#shells", TabbedContent)
        active = tabs.active
        if active:
            await tabs.remove_pane(active)
        if not tabs.tab_count:
            tabs.display = False
        self.table.focus()
        self.refresh_bindings()

    def on_terminal_pane_detached(self, _: TerminalPane.Detached) -> None:
        self.table.focus()
