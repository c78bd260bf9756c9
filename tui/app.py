"""The Textual dashboard (placeholder screen until the dashboard lands)."""

from __future__ import annotations

from textual.app import App, ComposeResult
from textual.widgets import Footer, Header, Static


class WrennApp(App[None]):
    TITLE = "wrenn-tui"
    BINDINGS = [("q", "quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("capsules will be listed here", id="placeholder")
        yield Footer()


def run_dashboard() -> None:
    WrennApp().run()
