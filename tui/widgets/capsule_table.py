"""The capsule table: one row per capsule, updated in place every second.

Rows are keyed by capsule id. Cells are rewritten with `update_cell` only when their content
changed, and only for rows on screen (a row scrolled into view is brought up to date then), so
a tick costs what the screen shows rather than the size of the fleet. The cursor follows the
selected capsule, not the row index, through re-sorts, inserts and removals, so a person's
selection never jumps to another capsule under them.

The live figures share a cell with their sparkline (guest memory with the host RSS beside it,
guest CPU with the host's), so a tick changes two cells per running row rather than five.

The table fits its width (`fit`): the capsule id, its state and the memory and CPU sparklines
with their current values always show; as the window narrows the other columns give way in
this order: the full id becomes its shortest unique prefix (at least 6 characters, like git's
short hashes), then TEMPLATE, SNAPSHOT, UPTIME, the host's figures beside the guest's (rss,
host CPU), vCPU/MEM and last HEALTH. The sparklines take the width that is left (one block per
second, so a wider window shows more history) and a resize re-lays the table at once, keeping
the selection and the sort.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, cast

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual.binding import Binding, BindingType
from textual.cache import LRUCache
from textual.coordinate import Coordinate
from textual.css.styles import RenderStyles
from textual.geometry import Region
from textual.strip import Strip
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey

from backend.capsules.models import Capsule, State
from backend.sampler import Sample
from tui import format as fmt
from tui.widgets.sparkline import sparkline

Cell = Text
"""Always Text: a str cell would be parsed as markup, and a capsule's reason may hold '['."""

SPARK_MIN = 10
"""Narrowest sparkline: below it the next column gives way."""
SPARK_MAX = 120
"""Seconds of history kept for the sparklines (one block per second): the widest they grow."""
ID_MIN = 6
"""Shortest id prefix shown when ids are shortened."""
ID_PREFIX = "cl-"
CELL_CACHE_SIZE = 2048
"""Rendered cells kept: every visible cell, with and without the cursor, several times over."""
LINE_CACHE_SIZE = 256
"""DataTable keeps 1000 rows and lines by default, keyed by its update count, so after a few
ticks nearly all are stale and only make each full garbage collection slower (a gen-2 pass over
those segments measured 60-80 ms, long enough to hold a keypress past 100 ms)."""

STATE_STYLES: dict[State, str] = {
    State.RUNNING: "bold green",
    State.PAUSED: "bold blue",
    State.PENDING: "yellow",
    State.PAUSING: "yellow",
    State.RESUMING: "yellow",
    State.STOPPED: "dim",
    State.ERROR: "bold red",
}
STATE_LABELS: dict[State, str] = {
    State.PENDING: "creating…",
    State.PAUSING: "pausing…",
    State.RESUMING: "resuming…",
}


class SortMode(enum.Enum):
    CREATED = "created"
    CPU = "cpu"
    MEMORY = "mem"


@dataclass(frozen=True)
class Sort:
    mode: SortMode = SortMode.CREATED
    descending: bool = False

    @property
    def arrow(self) -> str:
        return "↓" if self.descending else "↑"

    @property
    def label(self) -> str:
        if self.mode is SortMode.CREATED:
            return SortMode.CREATED.value
        return f"{self.mode.value} {self.arrow}"

    def toggled(self, mode: SortMode) -> Sort:
        """The same key again flips the direction; a new key starts with the largest first."""
        if mode is self.mode:
            return Sort(mode, not self.descending)
        return Sort(mode, descending=True)


@dataclass(frozen=True)
class CapsuleView:
    """Everything one row shows, gathered by the screen from the manager and the sampler."""

    capsule: Capsule
    sample: Sample | None = None
    mem_history: Sequence[tuple[float, float]] = ()
    cpu_history: Sequence[tuple[float, float]] = ()
    snapshot_bytes: int | None = None
    operation: str | None = None
    """An operation this dashboard has in flight on the capsule ("destroying")."""


@dataclass(frozen=True)
class ColumnSpec:
    key: str
    head: str
    width: int
    tail: str = ""
    """Figures shown beside the head's, after a middle dot."""

    def label(self, arrow: str = "") -> str:
        head = f"{self.head} {arrow}" if arrow else self.head
        return f"{head} · {self.tail}" if self.tail else head


CELL_PAD = 2
"""DataTable's cell padding, both sides together."""
FULL_ID = len(ID_PREFIX) + 12
HEALTH_WIDTH = 14
FIXED = (
    ColumnSpec("state", "STATE", 11),
    ColumnSpec("template", "TEMPLATE", 8),
    ColumnSpec("size", "vCPU/MEM", 8),
    ColumnSpec("uptime", "UPTIME", 7),
    ColumnSpec("snapshot", "SNAPSHOT", 8),
    ColumnSpec("health", "HEALTH", HEALTH_WIDTH),
)
MEM_FIGURES = 12
"""` 52.0M/240M` at its widest (` 1023M/64.0G`)."""
CPU_FIGURES = 5
"""` 100%`."""
RSS_FIGURES = 11
"""`  rss 1023M`."""
HOST_CPU_FIGURES = 12
"""`  host 1000%`."""
GIVE_WAY = ("id", "template", "snapshot", "uptime", "host", "size", "health")
"""What gives way, first to last, as the window narrows ("id": the id is shortened,
"host": the host's figures beside the guest's)."""
SORT_COLUMNS = {SortMode.CPU: "cpu", SortMode.MEMORY: "mem"}


@dataclass(frozen=True)
class TableLayout:
    columns: tuple[ColumnSpec, ...]
    spark: int
    """Sparkline width (= seconds of history shown)."""
    host_figures: bool
    short_ids: bool

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(spec.key for spec in self.columns)


def fit(width: int, short_id_width: int = FULL_ID) -> TableLayout:
    """The columns that fit `width` cells, each sparkline at least SPARK_MIN wide unless even
    the four columns that always show leave less (then the table scrolls sideways)."""
    layout = _layout(width, (), short_id_width)
    for step in range(1, len(GIVE_WAY) + 1):
        if layout.spark >= SPARK_MIN:
            break
        layout = _layout(width, GIVE_WAY[:step], short_id_width)
    if layout.spark < SPARK_MIN:
        layout = replace(layout, spark=max(layout.spark, 4))
        layout = _layout(width, GIVE_WAY, short_id_width, layout.spark)
    return layout


def _layout(
    width: int, dropped: tuple[str, ...], short_id_width: int, spark: int | None = None
) -> TableLayout:
    short_ids = "id" in dropped
    host = "host" not in dropped
    columns = [ColumnSpec("id", "ID", short_id_width if short_ids else FULL_ID)]
    columns += [spec for spec in FIXED if spec.key not in dropped]
    figures = MEM_FIGURES + CPU_FIGURES + (RSS_FIGURES + HOST_CPU_FIGURES if host else 0)
    used = sum(spec.width + CELL_PAD for spec in columns) + figures + 2 * CELL_PAD
    if spark is None:
        spark = min(SPARK_MAX, (width - used) // 2)
    tail_mem, tail_cpu = ("HOST RSS", "HOST CPU") if host else ("", "")
    columns.append(
        ColumnSpec("mem", "GUEST MEM", spark + MEM_FIGURES + (RSS_FIGURES if host else 0), tail_mem)
    )
    columns.append(
        ColumnSpec(
            "cpu", "GUEST CPU", spark + CPU_FIGURES + (HOST_CPU_FIGURES if host else 0), tail_cpu
        )
    )
    return TableLayout(tuple(columns), spark, host, short_ids)


def short_ids(capsule_ids: Sequence[str]) -> dict[str, str]:
    """Each id's shortest prefix (without `cl-`, at least ID_MIN long) that no other id in
    `capsule_ids` shares, one length for all so the column lines up."""
    bodies = {cid: cid.removeprefix(ID_PREFIX) for cid in capsule_ids}
    longest = max((len(b) for b in bodies.values()), default=ID_MIN)
    length = ID_MIN
    while length < longest and len({b[:length] for b in bodies.values()}) < len(bodies):
        length += 1
    return {cid: body[:length] for cid, body in bodies.items()}


def _state_cell(view: CapsuleView) -> Text:
    state = view.capsule.state
    if view.operation:
        return Text(f"{view.operation}…", style="yellow")
    return Text(STATE_LABELS.get(state, state.value), style=STATE_STYLES[state])


def _health_cell(view: CapsuleView) -> Text:
    capsule, sample = view.capsule, view.sample
    if capsule.state == State.ERROR:
        # Whole words or an ellipsis, never a cut; the detail screen shows all of it.
        reason = Text(capsule.reason or "error", style="red")
        reason.truncate(HEALTH_WIDTH, overflow="ellipsis")
        return reason
    if capsule.state != State.RUNNING or sample is None:
        return Text(fmt.UNKNOWN, style="dim")
    if sample.healthy:
        return Text("● ok", style="green")
    return Text(f"● {sample.error or 'unhealthy'}", style="red")


def _uptime_cell(view: CapsuleView, now: float) -> Text:
    capsule = view.capsule
    if capsule.state != State.RUNNING or capsule.started_at is None:
        return Text(fmt.UNKNOWN)
    return Text(fmt.age(now - capsule.started_at))


def _live_cell(spark: Text, guest: str | None, host_label: str, host: str | None) -> Text:
    """A sparkline, the guest's figure in bold, then the host's beside it (None: not shown)."""
    cell = Text.assemble(spark)
    if guest is not None:
        cell.append(guest, style="bold")
    if host is not None:
        cell.append(f"  {host_label} ", style="dim")
        cell.append(host)
    return cell


def _mem_cell(view: CapsuleView, now: float, layout: TableLayout) -> Text:
    sample = view.sample
    total = sample.guest_mem_total if sample and sample.guest_mem_total else None
    ceiling = float(total or view.capsule.memory_mib << 20)
    spark = sparkline(view.mem_history, now, layout.spark, ceiling)
    used = sample.guest_mem_used if sample else None
    rss = sample.host_rss if sample and layout.host_figures else None
    return _live_cell(
        spark,
        None if used is None else f" {fmt.size(used)}/{fmt.size(total)}",
        "rss",
        None if rss is None else fmt.size(rss),
    )


def _cpu_cell(view: CapsuleView, now: float, layout: TableLayout) -> Text:
    sample = view.sample
    spark = sparkline(view.cpu_history, now, layout.spark, 100.0)
    guest = sample.guest_cpu_pct if sample else None
    host = sample.host_cpu_pct if sample and layout.host_figures else None
    return _live_cell(
        spark,
        None if guest is None else f" {fmt.percent(guest):>4}",
        "host",
        None if host is None else fmt.percent(host),
    )


def _steady(a: CapsuleView, b: CapsuleView) -> bool:
    """Between the two views only the live figures (uptime, memory, CPU) can differ."""

    def health(view: CapsuleView) -> tuple[bool, str | None] | None:
        return None if view.sample is None else (view.sample.healthy, view.sample.error)

    return (
        a.capsule == b.capsule
        and a.operation == b.operation
        and a.snapshot_bytes == b.snapshot_bytes
        and health(a) == health(b)
    )


def render_row(
    view: CapsuleView,
    now: float,
    layout: TableLayout,
    label: str,
    previous: tuple[CapsuleView, dict[str, Cell]] | None = None,
) -> dict[str, Cell]:
    """The row's cells, `label` in the id column; with the `previous` view and cells (drawn
    with the same layout and label), only what can have changed is rebuilt (most ticks change
    only the live figures)."""
    if previous is not None and _steady(previous[0], view):
        cells = dict(previous[1])
    else:
        capsule = view.capsule
        cells = {
            "id": Text(label),
            "state": _state_cell(view),
            "template": Text(capsule.template),
            "size": Text(f"{capsule.vcpus}/{fmt.mib(capsule.memory_mib)}"),
            "snapshot": Text(fmt.size(view.snapshot_bytes) if view.snapshot_bytes else fmt.UNKNOWN),
            "health": _health_cell(view),
        }
    cells["uptime"] = _uptime_cell(view, now)
    cells["mem"] = _mem_cell(view, now, layout)
    cells["cpu"] = _cpu_cell(view, now, layout)
    return cells


def _same(a: Cell, b: Cell) -> bool:
    # Text equality ignores the base style, and a colour change alone must still repaint.
    return a is b or (a.plain == b.plain and a.style == b.style and a.spans == b.spans)


def _sort_value(view: CapsuleView, mode: SortMode) -> float:
    sample = view.sample
    if mode is SortMode.CPU:
        return sample.guest_cpu_pct if sample and sample.guest_cpu_pct is not None else -1.0
    if mode is SortMode.MEMORY:
        return float(sample.guest_mem_used) if sample and sample.guest_mem_used is not None else -1
    return view.capsule.created_at


class _FrameStyles:
    """A component's RenderStyles with rich_style computed once."""

    __slots__ = ("_styles", "rich_style")

    def __init__(self, styles: RenderStyles) -> None:
        self._styles = styles
        self.rich_style = styles.rich_style

    def __getattr__(self, name: str) -> Any:
        return getattr(self._styles, name)


class CapsuleTable(DataTable[Cell]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "screen.details", "Details"),
        Binding("j", "cursor_down", "Down"),
        Binding("k", "cursor_up", "Up"),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.row_sort = Sort()
        self._views: dict[str, CapsuleView] = {}
        self._cells: dict[str, dict[str, Cell]] = {}
        self._drawn: dict[str, CapsuleView] = {}
        """The view each row's cells were last built from."""
        self._stale: set[str] = set()
        """Rows whose view changed while they were off screen."""
        self._now = 0.0
        self._versions: dict[tuple[RowKey, ColumnKey], int] = {}
        self._version = 0
        self._rendered: LRUCache[tuple[object, ...], list[list[Segment]]] = LRUCache(
            CELL_CACHE_SIZE
        )
        self._frame_styles: dict[tuple[str, ...], _FrameStyles] = {}
        self._row_render_cache = LRUCache(LINE_CACHE_SIZE)
        self._line_cache = LRUCache(LINE_CACHE_SIZE)
        self._row_renderable_cache = LRUCache(LINE_CACHE_SIZE)
        self._layout = fit(200)
        self._short: dict[str, str] = {}
        """Capsule id -> its shortest unique prefix among the rows."""

    def on_mount(self) -> None:
        self._relayout(force=True)

    @property
    def layout_now(self) -> TableLayout:
        return self._layout

    @property
    def selected_id(self) -> str | None:
        if self.row_count == 0:
            return None
        row = min(self.cursor_row, self.row_count - 1)
        return self.coordinate_to_cell_key(Coordinate(row, 0)).row_key.value

    def view(self, capsule_id: str) -> CapsuleView | None:
        return self._views.get(capsule_id)

    def label(self, capsule_id: str) -> str:
        """What the id column shows for the capsule (its id, or its shortest unique prefix)."""
        return capsule_id if not self._layout.short_ids else self._short.get(capsule_id, capsule_id)

    def _available_width(self) -> int:
        """Cells across the table, a vertical scrollbar's width always kept free (so rows
        overflowing the height do not re-lay the columns)."""
        width = self.outer_size.width or self.app.size.width
        return width - self.styles.gutter.width - self.styles.scrollbar_size_vertical

    def _relayout(self, force: bool = False) -> None:
        short = short_ids(list(self._views))
        short_width = max((len(v) for v in short.values()), default=ID_MIN)
        layout = fit(self._available_width(), short_width)
        if not force and layout == self._layout and (not layout.short_ids or short == self._short):
            return
        self._layout, self._short = layout, short
        self._rebuild()

    def _rebuild(self) -> None:
        """Columns and rows anew for the current layout, the selection and the sort kept."""
        selected = self.selected_id
        self.clear(columns=True)
        self._versions.clear()
        self._rendered.clear()
        self._cells.clear()
        self._drawn.clear()
        self._stale.clear()
        for spec in self._layout.columns:
            arrow = self.row_sort.arrow if SORT_COLUMNS.get(self.row_sort.mode) == spec.key else ""
            self.add_column(spec.label(arrow), width=spec.width, key=spec.key)
        for capsule_id, view in self._views.items():
            self._add(capsule_id, view)
        self._apply_sort(selected, force=bool(self._views))

    def _add(self, capsule_id: str, view: CapsuleView) -> None:
        cells = render_row(view, self._now, self._layout, self.label(capsule_id))
        keys = self._layout.keys
        row_key = self.add_row(*(cells[key] for key in keys), key=capsule_id)
        for key in keys:
            self._touch(row_key, ColumnKey(key))
        self._cells[capsule_id] = cells
        self._drawn[capsule_id] = view

    def show(self, views: Sequence[CapsuleView], now: float) -> None:
        """Make the rows match `views`: add and remove rows, re-sort, and update the changed
        cells of the rows on screen (the others when they scroll into view)."""
        selected = self.selected_id
        wanted = {view.capsule.id: view for view in views}
        for gone in [key for key in self._views if key not in wanted]:
            self.remove_row(gone)
            del self._views[gone]
            del self._cells[gone]
            del self._drawn[gone]
            self._stale.discard(gone)
        self._now = now
        added = [capsule_id for capsule_id in wanted if capsule_id not in self._views]
        self._views.update(wanted)
        if added or len(wanted) < len(self._short):
            # the shortest unique prefixes may have changed; a rebuild draws every row anew
            short = short_ids(list(self._views))
            if self._layout.short_ids and short != self._short:
                self._relayout(force=True)
                return
            self._short = short
        for capsule_id, view in wanted.items():
            if capsule_id not in self._cells:
                self._add(capsule_id, view)
            else:
                self._stale.add(capsule_id)
        self._apply_sort(selected)
        self._refresh_visible()

    def _refresh_visible(self) -> None:
        if not self._stale:
            return
        header = self.header_height if self.show_header else 0
        top = int(self.scroll_y)
        bottom = min(self.row_count, top + max(0, self.size.height - header) + 1)
        for row in self.ordered_rows[top:bottom]:
            capsule_id = str(row.key.value)
            if capsule_id in self._stale:
                self._stale.discard(capsule_id)
                self._update_row(capsule_id)

    def _update_row(self, capsule_id: str) -> None:
        view = self._views[capsule_id]
        previous = self._cells[capsule_id]
        cells = render_row(
            view,
            self._now,
            self._layout,
            self.label(capsule_id),
            (self._drawn[capsule_id], previous),
        )
        for key in self._layout.keys:
            if not _same(previous[key], cells[key]):
                self.update_cell(capsule_id, key, cells[key])
                self._touch(RowKey(capsule_id), ColumnKey(key))
        self._cells[capsule_id] = cells
        self._drawn[capsule_id] = view

    def watch_scroll_y(self, old_value: float, new_value: float) -> None:
        super().watch_scroll_y(old_value, new_value)
        self._refresh_visible()

    def on_resize(self) -> None:
        self._relayout()
        self._refresh_visible()

    def set_sort(self, sort: Sort) -> None:
        self.row_sort = sort
        for spec in self._layout.columns:
            arrow = sort.arrow if SORT_COLUMNS.get(sort.mode) == spec.key else ""
            self.columns[ColumnKey(spec.key)].label = Text(spec.label(arrow))
        # Sorting even when the order stands is what makes the table redraw its header.
        self._apply_sort(self.selected_id, force=True)

    def _apply_sort(self, selected: str | None, force: bool = False) -> None:
        mode, descending = self.row_sort.mode, self.row_sort.descending
        ranked = sorted(
            self._views.values(),
            key=lambda v: (_sort_value(v, mode), v.capsule.created_at, v.capsule.id),
            reverse=descending,
        )
        # DataTable sorts by cell values: the id column holds each row's (unique) label.
        order = {self.label(view.capsule.id): index for index, view in enumerate(ranked)}
        current = [self.label(str(row.key.value)) for row in self.ordered_rows]
        if force or current != sorted(current, key=order.__getitem__):
            self.sort("id", key=lambda cell: order[str(cell)])
        if selected is not None and selected in self._views:
            index = self.get_row_index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index, animate=False, scroll=False)

    # -- rendering --------------------------------------------------------------------------

    def notify_style_update(self) -> None:
        self._rendered.clear()
        self._frame_styles.clear()
        super().notify_style_update()

    def render_lines(self, crop: Region) -> list[Strip]:
        # Styles cannot change while one frame is drawn.
        self._frame_styles.clear()
        return super().render_lines(crop)

    def get_component_styles(self, *names: str) -> RenderStyles:
        # DataTable asks for a component's styles once per line drawn and reads only their
        # rich_style, which walks every ancestor's styles (~20% of a frame at 55 rows); within
        # one frame the answer is the same.
        styles = self._frame_styles.get(names)
        if styles is None:
            styles = _FrameStyles(super().get_component_styles(*names))
            self._frame_styles[names] = styles
        return cast(RenderStyles, styles)

    def _touch(self, row_key: RowKey, column_key: ColumnKey) -> None:
        self._version += 1
        self._versions[(row_key, column_key)] = self._version

    def _render_cell(
        self,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool = False,
        hover: bool = False,
    ) -> list[list[Segment]]:
        # DataTable drops every rendered cell whenever any cell changes; a tick changes two
        # cells per running row, so re-rendering all of them (~600 Rich renders at 120 rows)
        # would dominate the frame. A cell whose content version, position and styling
        # inputs are unchanged reuses its last render.
        if row_index < 0 or column_index < 0:
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        row_key, column_key = self.coordinate_to_cell_key(Coordinate(row_index, column_index))
        key = (
            row_key,
            column_key,
            self._versions.get((row_key, column_key)),
            row_index,
            base_style,
            width,
            cursor,
            hover,
            self._show_hover_cursor,
            self.show_cursor,
            self.has_focus,
        )
        lines = self._rendered.get(key)
        if lines is None:
            cell = self._cells.get(str(row_key.value), {}).get(str(column_key.value))
            line = None
            if cell is not None:
                line = self._render_text_line(cell, row_index, column_index, base_style, width,
                                              cursor, hover)  # fmt: skip
            if line is not None:
                lines = [line]
            else:
                lines = super()._render_cell(
                    row_index, column_index, base_style, width, cursor, hover
                )
            self._rendered[key] = lines
        return lines

    def _render_text_line(
        self,
        cell: Text,
        row_index: int,
        column_index: int,
        base_style: Style,
        width: int,
        cursor: bool,
        hover: bool,
    ) -> list[Segment] | None:
        """The one line DataTable would render for a one-line Text cell that fits its column,
        without Rich's generic layout (Padding, render_lines, wrapping): the same segments in
        a quarter of the time (tests/tui/test_capsule_table.py compares the two). None when
        the cell needs the general path (a newline, or wider than the column)."""
        pad = self.cell_padding
        inner = width - 2 * pad
        if "\n" in cell.plain or cell.cell_len > inner:
            return None
        component_style, post_style = self._get_styles_to_render_cell(
            False,
            False,
            row_index < self.fixed_rows or column_index < self.fixed_columns,
            hover,
            cursor,
            self.show_cursor,
            self._show_hover_cursor,
            self.cursor_foreground_priority == "css",
            self.cursor_background_priority == "css",
        )
        pre_style = (
            base_style
            + Style.from_meta({"row": row_index, "column": column_index})
            + component_style
        )
        plain = Style.null()
        segments = [Segment(" " * pad, plain)] if pad else []
        console = self.app.console
        if cell.style:
            # Rich turns the Text's own style into a span under the others when it lays the
            # cell out; applying it first to every run is the same.
            own = console.get_style(cell.style)
            segments.extend(Segment.apply_style(cell.render(console), own))
        else:
            segments.extend(cell.render(console))
        fill = inner - cell.cell_len
        if fill:
            segments.append(Segment(" " * fill, plain))
        if pad:
            segments.append(Segment(" " * pad, plain))
        return list(Segment.apply_style(segments, pre_style, post_style or None))
