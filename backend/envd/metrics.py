"""Memory, CPU and disk figures.

CPU usage needs two readings of /proc/stat; a background sampler takes them on a fixed
clock and the /metrics handler only reads its last result, so a request never sleeps and
every caller sees the same, consistent one-interval window.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("envd.metrics")


@dataclass(frozen=True)
class MemInfo:
    total: int
    available: int
    cached: int
    free: int

    @property
    def used(self) -> int:
        return max(0, self.total - self.available)

    @property
    def used_fraction(self) -> float:
        return self.used / self.total if self.total > 0 else 0.0

    def figures(self) -> dict[str, int]:
        return {
            "mem_total": self.total,
            "mem_used": self.used,
            "mem_available": self.available,
            "mem_cache": self.cached,
        }


def parse_meminfo(text: str) -> MemInfo:
    """Parse /proc/meminfo; values are reported in bytes."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            number = int(fields[0])
        except ValueError:
            continue
        unit = fields[1].lower() if len(fields) > 1 else ""
        values[name.strip()] = number * 1024 if unit == "kb" else number
    total = values.get("MemTotal", 0)
    free = values.get("MemFree", 0)
    cached = values.get("Cached", 0)
    # Kernels before 3.14 lack MemAvailable; free + page cache + buffers is the usual estimate.
    available = values.get("MemAvailable", free + cached + values.get("Buffers", 0))
    return MemInfo(total=total, available=min(available, total), cached=cached, free=free)


@dataclass(frozen=True)
class CpuTimes:
    busy: int
    total: int


@dataclass(frozen=True)
class ProcStat:
    cpu: CpuTimes
    cpu_count: int


def parse_proc_stat(text: str) -> ProcStat:
    cpu = CpuTimes(0, 0)
    count = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            fields = [int(v) for v in line.split()[1:]]
            # guest and guest_nice (fields 9-10) are already counted in user and nice.
            core = fields[:8]
            idle = core[3] + (core[4] if len(core) > 4 else 0)
            total = sum(core)
            cpu = CpuTimes(busy=total - idle, total=total)
        elif line.startswith("cpu") and line[3:4].isdigit():
            count += 1
    return ProcStat(cpu=cpu, cpu_count=count)


def cpu_percent(prev: CpuTimes, cur: CpuTimes) -> float:
    total = cur.total - prev.total
    busy = cur.busy - prev.busy
    if total <= 0:
        return 0.0
    return round(min(100.0, max(0.0, 100.0 * busy / total)), 2)


@dataclass(frozen=True)
class DiskUsage:
    used: int
    total: int


def disk_usage(path: Path) -> DiskUsage:
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return DiskUsage(used=used, total=total)


class ProcReader:
    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc

    def meminfo(self) -> MemInfo:
        return parse_meminfo((self.proc / "meminfo").read_text())

    def stat(self) -> ProcStat:
        return parse_proc_stat((self.proc / "stat").read_text())


class CpuSampler:
    def __init__(self, reader: ProcReader, interval: float = 1.0) -> None:
        self.reader = reader
        self.interval = interval
        self.cpu_used_pct = 0.0
        self.cpu_count = os.cpu_count() or 1
        self.sampled_at = 0.0
        self.samples = 0
        self._prev: CpuTimes | None = None

    def sample(self) -> None:
        stat = self.reader.stat()
        if stat.cpu_count:
            self.cpu_count = stat.cpu_count
        if self._prev is not None:
            self.cpu_used_pct = cpu_percent(self._prev, stat.cpu)
            self.samples += 1
            self.sampled_at = time.time()
        self._prev = stat.cpu

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tick = 0
        while True:
            try:
                self.sample()
            except (OSError, ValueError, IndexError) as exc:
                log.warning("cpu sample failed: %s", exc)
            # Ticks are fixed offsets from the start, so the window never drifts with load;
            # ticks missed while the loop was busy (or the VM paused) are skipped, not bunched.
            now = loop.time()
            tick = max(tick + 1, int((now - start) / self.interval) + 1)
            await asyncio.sleep(max(0.0, start + tick * self.interval - now))
