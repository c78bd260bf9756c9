"""What the screens read from the app they run in, as a protocol: screens depend on this, not
on tui/app.py, so there is no import circle (the app imports the screens)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from backend.dashboard import ManagerPort
from tui.host import HostReader
from tui.sampling import MetricsSampler


class Dashboard(Protocol):
    backend: ManagerPort
    sampler: MetricsSampler
    clock: Callable[[], float]
    host_probe: HostReader
    accel: str | None
    cursor_blink: bool
