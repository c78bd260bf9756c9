"""Messages between the app and its screens, both ways.

Up: what the screens ask of the app; they post these and the app runs the operation in a worker
(screens never call the app's methods, and the app is the only owner of workers).
Down: what the app tells the main screen, as data (the app never calls the screen's methods).
"""

from __future__ import annotations

from textual.message import Message

from backend.capsules.models import Capsule

# -- down: app -> main screen -------------------------------------------------------------------


class CapsuleChanged(Message):
    """The backend recorded this capsule (the manager's listener hands over the record)."""

    def __init__(self, capsule: Capsule) -> None:
        super().__init__()
        self.capsule = capsule


class CapsulesStale(Message):
    """Something changed that no single record says (a destroy, a re-adoption, the
    accelerator became known): read the list again."""


class OperationChanged(Message):
    """The dashboard started (`operation` "pausing", ...) or finished (None) an operation on
    a capsule; its row shows it and its keys are off meanwhile."""

    def __init__(self, capsule_id: str, operation: str | None) -> None:
        super().__init__()
        self.capsule_id = capsule_id
        self.operation = operation


# -- up: screens -> app -------------------------------------------------------------------------


class CapsuleRequest(Message):
    """An operation on one capsule; the app checks again that it applies in its state."""

    def __init__(self, capsule_id: str) -> None:
        super().__init__()
        self.capsule_id = capsule_id


class PauseRequested(CapsuleRequest):
    pass


class ResumeRequested(CapsuleRequest):
    pass


class DestroyRequested(CapsuleRequest):
    """Asks first."""


class DetailsRequested(CapsuleRequest):
    pass


class TemplateRequested(CapsuleRequest):
    """Save the capsule as a template (asks its name)."""


class ForkRequested(CapsuleRequest):
    """Fork the capsule (asks how many)."""


class CreateRequested(Message):
    """Open the create form, with `template` chosen when given."""

    def __init__(self, template: str | None = None) -> None:
        super().__init__()
        self.template = template


class TemplatesRequested(Message):
    """Open the templates view."""


class TemplateRemoveRequested(Message):
    """Remove a saved template (asks first)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name


class TemplatesRefreshWanted(Message):
    """The templates view saw a build end: its list is read again."""


class HelpRequested(Message):
    pass


class ImageBuildRequested(Message):
    pass


class HostRequested(Message):
    """Open the host view."""


class HostRefreshWanted(Message):
    """The host view wants its figures measured again."""


class FreeSpaceRequested(Message):
    """Remove what the host view found reclaimable (asks first)."""
