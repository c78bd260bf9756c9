"""The small form behind `n`: memory, vCPUs and network mode of a new capsule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.validation import Integer
from textual.widgets import Button, Input, Label, RadioButton, RadioSet

from backend.runtime.network import MODES

MEMORY_RANGE = (64, 65536)
VCPU_RANGE = (1, 64)
NETWORK_LABELS = {
    "none": "isolated: envd only",
    "internet": "internet: outbound, no host",
}


@dataclass(frozen=True)
class CreateRequest:
    memory_mib: int
    vcpus: int
    network: str = "none"


class CreateScreen(ModalScreen[CreateRequest | None]):
    CSS_PATH = "create.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, memory_mib: int = 256, vcpus: int = 1, cursor_blink: bool = True) -> None:
        super().__init__()
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.cursor_blink = cursor_blink

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("New capsule", id="title")
            yield Label("Memory (MiB)")
            yield Input(
                str(self.memory_mib),
                type="integer",
                validators=[Integer(*MEMORY_RANGE)],
                id="memory",
            )
            yield Label("vCPUs")
            yield Input(
                str(self.vcpus), type="integer", validators=[Integer(*VCPU_RANGE)], id="vcpus"
            )
            yield Label("Network")
            with RadioSet(id="network"):
                for mode in MODES:
                    label = NETWORK_LABELS.get(mode, mode)
                    yield RadioButton(label, value=mode == "none", name=mode)
            yield Label("", id="error")
            with Horizontal(id="buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        for field in self.query(Input):
            field.cursor_blink = self.cursor_blink
        self.query_one("#memory", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "create":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    @property
    def network(self) -> str:
        pressed = self.query_one("#network", RadioSet).pressed_button
        return pressed.name if pressed is not None and pressed.name else "none"

    def submit(self) -> None:
        problems = []
        for field_id, name, (low, high) in (
            ("memory", "memory", MEMORY_RANGE),
            ("vcpus", "vCPUs", VCPU_RANGE),
        ):
            field = self.query_one(f"#{field_id}", Input)
            result = field.validate(field.value)
            if result is not None and not result.is_valid:
                problems.append(f"{name} must be a whole number from {low} to {high}")
        if problems:
            self.query_one("#error", Label).update("; ".join(problems))
            return
        self.dismiss(
            CreateRequest(
                memory_mib=int(self.query_one("#memory", Input).value),
                vcpus=int(self.query_one("#vcpus", Input).value),
                network=self.network,
            )
        )
