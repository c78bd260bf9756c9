"""What the screens read from the app they run in, as a protocol: screens depend on this, not
on tui/app.py, so there is no import circle (the app imports the screens)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from backend.dashboard import ManagerPort
from tui.host import HostProbe
from tui.sampling import MetricsSampler


class Dashboard(Protocol):
    backend: ManagerPort
    sampler: MetricsSampler
    clock: Callable[[], float]
    host_probe: HostProbe
    accel: str | None
    cursor_blink: bool
    operations: dict[str, str]
    """Capsule id -> the operation the dashboard has in flight on it ("pausing", ...)."""
