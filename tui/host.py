"""Host-wide figures for the status line and the host view (psutil), behind a callable so tests
can freeze them, and what they mean for the next capsule."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from backend.capsules.hostcost import HostCost
from backend.capsules.models import Capsule
from backend.dashboard import ManagerPort
from tui.sampling import MetricsSampler


@dataclass(frozen=True)
class HostTotals:
    cpu_pct: float
    mem_used: int
    mem_total: int
    mem_available: int | None = None
    """What the kernel says can be given out without swapping (None: total - used)."""
    load_1m: float | None = None
    disk_free: int | None = None
    """Bytes free where capsule state (disks, snapshots) is written."""
    agent_cpu_pct: float | None = None
    """This process (dashboard and its sampler thread), % of one core."""

    @property
    def available(self) -> int:
        return (
            self.mem_available
            if self.mem_available is not None
            else (self.mem_total - self.mem_used)
        )


HostReader = Callable[[], HostTotals]
_ME = psutil.Process()


def probe_host(state_dir: Path | None = None) -> HostTotals:
    """CPU since the previous call (psutil keeps the last reading), so it never sleeps."""
    memory = psutil.virtual_memory()
    disk_free = None
    if state_dir is not None:
        try:
            disk_free = shutil.disk_usage(state_dir).free
        except OSError:
            disk_free = None
    return HostTotals(
        cpu_pct=psutil.cpu_percent(interval=None),
        mem_used=memory.total - memory.available,
        mem_total=memory.total,
        mem_available=memory.available,
        load_1m=os.getloadavg()[0],
        disk_free=disk_free,
        agent_cpu_pct=_ME.cpu_percent(interval=None),
    )


@dataclass(frozen=True)
class Capacity:
    """How many more capsules of the default size the host has room for, and on what basis."""

    per_capsule: int
    """Host bytes one more capsule is expected to cost."""
    basis: str
    capsules_cost: int
    """What the running capsules cost the host now (the sum of their host costs)."""
    fits: int
    disk_fits: bool | None
    """Whether the state dir has room for one more capsule's snapshot (None: unknown)."""

    @property
    def warnings(self) -> tuple[str, ...]:
        found = []
        if self.fits < 1:
            found.append("no memory for another capsule")
        if self.disk_fits is False:
            found.append("no disk for another snapshot")
        return tuple(found)


def capacity(host: HostTotals, costs: Iterable[int], default_mib: int) -> Capacity:
    """The measure used: the mean host cost of the running capsules (backend/capsules/
    hostcost.py: QEMU's own memory plus the capsule's share of its template's RAM, or its own
    RAM file); with none running, the default guest size."""
    known = [c for c in costs if c]
    if known:
        per_capsule = sum(known) // len(known)
        basis = f"mean host cost of {len(known)} running (own memory + share of the template)"
    else:
        per_capsule = default_mib << 20
        basis = "default guest size (nothing running to measure)"
    disk_fits = None if host.disk_free is None else host.disk_free >= (default_mib << 20)
    return Capacity(
        per_capsule=per_capsule,
        basis=basis,
        capsules_cost=sum(known),
        fits=max(0, host.available // max(per_capsule, 1)),
        disk_fits=disk_fits,
    )


SAMPLE_FRESH_S = 2.5
"""A sample older than this (a capsule the sampler no longer reads) is not used for its cost."""


def capsule_costs(backend: ManagerPort, sampler: MetricsSampler) -> dict[str, HostCost]:
    """What each running capsule costs the host (backend/capsules/hostcost.py), QEMU's own
    memory taken from the sampler's latest sample: the status line asks every second, and the
    sampler has just read every QEMU's memory."""
    now = time.time()

    def own(capsule: Capsule) -> int | None:
        sample = sampler.latest(capsule.id)
        if sample is None or sample.host_own is None or now - sample.ts > SAMPLE_FRESH_S:
            return None
        return sample.host_own

    return backend.host_costs(own)
