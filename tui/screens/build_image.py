"""Offered when no capsule image is installed: build it here, with the builder's own progress.

The build runs in a thread worker (debootstrap and mkfs block); its progress callback hops back
to the UI thread with `call_from_thread`.
"""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, ProgressBar, Static

from backend.dashboard import ImageBuildFailed, ManagerPort

INTRO = (
    "No capsule image is installed, so capsules cannot be created yet.\n"
    "Build the default image now? It downloads a Debian kernel and runs debootstrap: "
    "a few minutes the first time, and it needs root."
)


class BuildImageScreen(ModalScreen[bool]):
    """Dismissed with True once an image is installed."""

    CSS_PATH = "build_image.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "close", "Close")]

    def __init__(self, port: ManagerPort) -> None:
        super().__init__()
        self.port = port
        self.building = False

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("Capsule image", id="title")
            yield Static(INTRO, id="message")
            yield Label("", id="step")
            yield ProgressBar(total=1.0, show_eta=False, id="progress")
            with Horizontal(id="buttons"):
                yield Button("Build", variant="primary", id="build")
                yield Button("Not now", id="close")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "build":
            self.start_build()
        else:
            self.action_close()

    def action_close(self) -> None:
        if not self.building:
            self.dismiss(self.port.image_present())

    def start_build(self) -> None:
        self.building = True
        self.query_one("#build", Button).disabled = True
        self.query_one("#close", Button).disabled = True
        self.set_class(True, "-building")
        self.show_progress("starting", 0.0)
        self.build()

    def show_progress(self, step: str, fraction: float) -> None:
        self.query_one("#step", Label).update(Text(step))
        self.query_one("#progress", ProgressBar).update(progress=fraction)

    def finished(self, error: str | None) -> None:
        self.building = False
        self.query_one("#close", Button).disabled = False
        if error is None:
            self.app.notify("capsule image built", title="Image")
            self.dismiss(True)
            return
        self.query_one("#build", Button).disabled = False
        self.query_one("#step", Label).update(Text(f"build failed: {error}", style="red"))
        self.app.notify(
            error, title="Image build failed", severity="error", timeout=15, markup=False
        )
        self.log.error(f"image build failed: {error}")

    @work(thread=True, exclusive=True, exit_on_error=False)
    def build(self) -> None:
        def report(step: str, fraction: float) -> None:
            self.app.call_from_thread(self.show_progress, step, fraction)

        error: str | None = None
        try:
            self.port.build_image(report)
        except ImageBuildFailed as exc:
            error = str(exc)
        self.app.call_from_thread(self.finished, error)
