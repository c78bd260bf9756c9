"""`T`: the templates capsules start from (the images and the ones saved from capsules), with
their size on disk, source, memory size, creation time and how many capsules use each. `n`
creates a capsule from the selected one, ctrl+d removes a saved one (asks first). Recipe builds
running now, started here or by any other process (`wrenn-tui template build`), show below the
table with their current step and latest log lines (read every second; when one ends the list
is read again)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, cast

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from backend.dashboard import BuildStatus, TemplateInfo
from tui import format as fmt
from tui.messages import (
    CreateRequested,
    HelpRequested,
    TemplateRemoveRequested,
    TemplatesRefreshWanted,
)

if TYPE_CHECKING:
    from tui.context import Dashboard

BUILD_LOG_LINES = 6

COLUMNS = (
    ("name", "NAME"),
    ("source", "SOURCE"),
    ("memory", "MEMORY"),
    ("size", "ON DISK"),
    ("created", "CREATED"),
    ("users", "CAPSULES"),
)


def _created(created_at: float) -> str:
    if not created_at:
        return fmt.UNKNOWN
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(created_at))


def builds_text(builds: Sequence[BuildStatus]) -> Text:
    """Each running build: its name, step and current line, then its latest log lines."""
    text = Text()
    for build in builds:
        step = f"step {build.step}/{build.steps}" if build.step else "starting"
        text.append(f"building {build.name}", style="bold")
        text.append(f"  {step}  {build.current}\n")
        for line in build.log[-BUILD_LOG_LINES:]:
            text.append(f"  {line}\n", style="dim")
    text.rstrip()
    return text


def template_cells(template: TemplateInfo) -> tuple[Text, ...]:
    if template.builtin:
        memory = "any"
    else:
        network = "" if template.network in ("", "none") else f" {template.network}"
        memory = f"{template.vcpus}/{fmt.mib(template.memory_mib)}{network}"
    source = template.source if template.builtin else f"capsule {template.source}"
    return (
        Text(template.name, style="bold" if not template.builtin else ""),
        Text(source),
        Text(memory),
        Text(fmt.size(template.allocated)),
        Text(_created(template.created_at)),
        Text(str(template.users), style="bold" if template.users else "dim"),
    )


class TemplatesScreen(Screen[None]):
    CSS_PATH = "templates.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,T", "app.pop_screen", "Back"),
        Binding("n", "create", "New capsule"),
        Binding("ctrl+d", "remove", "Delete"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("question_mark", "help", "Help", key_display="?"),
    ]

    def __init__(self, templates: Sequence[TemplateInfo]) -> None:
        super().__init__()
        self.templates: tuple[TemplateInfo, ...] = tuple(templates)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="summary")
        table: DataTable[Text] = DataTable(cursor_type="row", zebra_stripes=True, id="templates")
        for key, label in COLUMNS:
            table.add_column(label, key=key)
        yield table
        yield Static("", id="builds")
        yield Footer()

    def on_mount(self) -> None:
        self.show(self.templates)
        self.query_one(DataTable).focus()
        self._building: set[str] = set()
        self.poll_builds()
        self.set_interval(1.0, self.poll_builds)

    def poll_builds(self) -> None:
        try:
            builds = cast("Dashboard", self.app).backend.builds()
        except OSError:
            builds = []
        panel = self.query_one("#builds", Static)
        panel.display = bool(builds)
        panel.update(builds_text(builds))
        names = {b.name for b in builds}
        if self._building - names:
            self.post_message(TemplatesRefreshWanted())  # a build ended: a new template
        self._building = names

    @property
    def table(self) -> DataTable[Text]:
        return self.query_one("#templates", DataTable)

    def show(self, templates: Sequence[TemplateInfo]) -> None:
        """The rows anew (the selection kept by name)."""
        self.templates = tuple(templates)
        table = self.table
        selected = self.selected.name if self.selected is not None else None
        table.clear()
        for template in self.templates:
            table.add_row(*template_cells(template), key=template.name)
        if selected is not None and selected in {t.name for t in self.templates}:
            table.move_cursor(row=table.get_row_index(selected), animate=False)
        saved = [t for t in self.templates if not t.builtin]
        total = sum(t.allocated for t in saved)
        self.query_one("#summary", Static).update(
            f"{len(saved)} saved template{'s' if len(saved) != 1 else ''}, "
            f"{fmt.size(total)} on disk"
        )
        self.refresh_bindings()

    @property
    def selected(self) -> TemplateInfo | None:
        if not self.is_mounted:
            return None
        table = self.table
        if table.row_count == 0:
            return None
        name = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return next((t for t in self.templates if t.name == name), None)

    @on(DataTable.RowHighlighted)
    def _moved(self) -> None:
        self.refresh_bindings()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "remove":
            template = self.selected
            return True if template is not None and not template.builtin else None
        if action == "create":
            return True if self.selected is not None else None
        return True

    def action_create(self) -> None:
        if (template := self.selected) is not None:
            self.post_message(CreateRequested(template.name))

    def action_remove(self) -> None:
        if (template := self.selected) is not None and not template.builtin:
            self.post_message(TemplateRemoveRequested(template.name))

    def action_cursor_down(self) -> None:
        self.table.action_cursor_down()

    def action_cursor_up(self) -> None:
        self.table.action_cursor_up()

    def action_help(self) -> None:
        self.post_message(HelpRequested())
