"""The small form behind `n`: the template, and for an image its memory, vCPUs and network
mode (a saved template brings its own, shown and not editable)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.validation import Integer
from textual.widgets import Button, Input, Label, RadioButton, RadioSet, Select

from backend.dashboard import DEFAULT_TEMPLATE, NETWORK_MODES, TemplateInfo
from tui import format as fmt

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
    template: str = DEFAULT_TEMPLATE
    saved_template: bool = False
    """A template saved from a capsule: its size and network mode are its own."""


def _choice_label(template: TemplateInfo) -> str:
    if template.builtin:
        return f"{template.name}  (image, any size)"
    return (
        f"{template.name}  ({template.vcpus}/{fmt.mib(template.memory_mib)}, "
        f"{fmt.size(template.allocated)})"
    )


class CreateScreen(ModalScreen[CreateRequest | None]):
    CSS_PATH = "create.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        templates: Sequence[TemplateInfo] = (),
        network_modes: Sequence[str] = NETWORK_MODES,
        *,
        template: str | None = None,
        memory_mib: int = 256,
        vcpus: int = 1,
        cursor_blink: bool = True,
    ) -> None:
        super().__init__()
        self.templates = {t.name: t for t in templates}
        self.network_modes = tuple(network_modes)
        names = list(self.templates)
        self.initial_template = (
            template
            if template in self.templates
            else (DEFAULT_TEMPLATE if DEFAULT_TEMPLATE in self.templates or not names else names[0])
        )
        self.memory_mib = memory_mib
        self.vcpus = vcpus
        self.cursor_blink = cursor_blink

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("New capsule", id="title")
            yield Label("Template")
            yield Select(
                [(_choice_label(t), t.name) for t in self.templates.values()]
                or [(DEFAULT_TEMPLATE, DEFAULT_TEMPLATE)],
                value=self.initial_template,
                allow_blank=False,
                id="template",
            )
            with Horizontal(id="size"):
                with Vertical():
                    yield Label("Memory (MiB)")
                    yield Input(
                        str(self.memory_mib),
                        type="integer",
                        validators=[Integer(*MEMORY_RANGE)],
                        id="memory",
                    )
                with Vertical():
                    yield Label("vCPUs")
                    yield Input(
                        str(self.vcpus),
                        type="integer",
                        validators=[Integer(*VCPU_RANGE)],
                        id="vcpus",
                    )
            yield Label("Network")
            with RadioSet(id="network"):
                for mode in self.network_modes:
                    label = NETWORK_LABELS.get(mode, mode)
                    yield RadioButton(label, value=mode == "none", name=mode)
            yield Label("", id="error")
            with Horizontal(id="buttons"):
                yield Button("Create", variant="primary", id="create")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        for field in self.query(Input):
            field.cursor_blink = self.cursor_blink
        self._template_chosen(self.initial_template)
        if self.saved_template is None:
            self.query_one("#memory", Input).focus()
        else:
            # nothing to fill in: enter creates
            self.query_one("#create", Button).focus()

    @property
    def template(self) -> str:
        value = self.query_one("#template", Select).value
        return value if isinstance(value, str) else DEFAULT_TEMPLATE

    @property
    def saved_template(self) -> TemplateInfo | None:
        found = self.templates.get(self.template)
        return found if found is not None and not found.builtin else None

    def on_select_changed(self, event: Select.Changed) -> None:
        if isinstance(event.value, str):
            self._template_chosen(event.value)

    def _template_chosen(self, name: str) -> None:
        """A saved template fixes the size and network: show its own, not editable."""
        saved = self.templates.get(name)
        fixed = saved is not None and not saved.builtin
        memory, vcpus = self.query_one("#memory", Input), self.query_one("#vcpus", Input)
        network = self.query_one("#network", RadioSet)
        if saved is not None and fixed:
            memory.value, vcpus.value = str(saved.memory_mib), str(saved.vcpus)
            for button in network.query(RadioButton):
                button.value = button.name == (saved.network or "none")
        for widget in (memory, vcpus, network):
            widget.disabled = fixed

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
        saved = self.saved_template
        if saved is not None:
            self.dismiss(
                CreateRequest(
                    memory_mib=saved.memory_mib,
                    vcpus=saved.vcpus,
                    network=saved.network or "none",
                    template=saved.name,
                    saved_template=True,
                )
            )
            return
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
                template=self.template,
            )
        )
