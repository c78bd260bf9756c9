"""`?`: every key of the screen it was opened from, with what it does."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label


class HelpScreen(ModalScreen[None]):
    CSS_PATH = "help.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,question_mark,q", "dismiss", "Close"),
    ]

    def __init__(self, keys: Sequence[tuple[str, str]]) -> None:
        super().__init__()
        self.keys = keys

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Keys", id="title")
            table: DataTable[str] = DataTable(cursor_type="none", show_header=False)
            table.add_columns("key", "action")
            table.add_rows(self.keys)
            yield table
            yield Label("esc closes", id="hint")

    def on_resize(self) -> None:
        # the list scrolls rather than pushing the title or the hint off a short window
        chrome = 4  # border, title and hint
        self.query_one(DataTable).styles.max_height = max(3, min(30, self.size.height - chrome))
