"""A one-field dialog: the name of a new template, how many forks. Enter answers, esc cancels;
an answer the validator refuses stays in the dialog with the reason under the field."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.validation import Validator
from textual.widgets import Button, Input, Label, Static


class PromptScreen(ModalScreen[str | None]):
    CSS_PATH = "prompt.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        title: str,
        message: str,
        *,
        value: str = "",
        placeholder: str = "",
        validator: Validator | None = None,
        confirm_label: str = "OK",
        cursor_blink: bool = True,
    ) -> None:
        super().__init__()
        self.title_text = title
        self.message = message
        self.value = value
        self.placeholder = placeholder
        self.validator = validator
        self.confirm_label = confirm_label
        self.cursor_blink = cursor_blink

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text, id="title")
            yield Static(self.message, id="message", markup=False)
            yield Input(
                self.value,
                placeholder=self.placeholder,
                validators=[self.validator] if self.validator else [],
                validate_on=["submitted"],
                id="answer",
            )
            yield Label("", id="error")
            with Horizontal(id="buttons"):
                yield Button(self.confirm_label, variant="primary", id="ok")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        field = self.query_one(Input)
        field.cursor_blink = self.cursor_blink
        field.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "ok":
            self.submit()
        else:
            self.dismiss(None)

    def action_cancel(self) -> None:
        self.dismiss(None)

    def submit(self) -> None:
        field = self.query_one(Input)
        answer = field.value.strip()
        result = field.validate(answer)
        if result is not None and not result.is_valid:
            self.query_one("#error", Label).update("; ".join(result.failure_descriptions))
            return
        self.dismiss(answer)
