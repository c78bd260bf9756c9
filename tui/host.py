"""Host-wide totals for the status line (psutil), behind a callable so tests can freeze them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class HostTotals:
    cpu_pct: float
    mem_used: int
    mem_total: int


HostProbe = Callable[[], HostTotals]


def probe_host() -> HostTotals:
    """CPU since the previous call (psutil keeps the last reading), so it never sleeps."""
    memory = psutil.virtual_memory()
    return HostTotals(
        cpu_pct=psutil.cpu_percent(interval=None),
        mem_used=memory.total - memory.available,
        mem_total=memory.total,
    )
