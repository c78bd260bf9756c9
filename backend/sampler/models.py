"""What the sampler polls and what it publishes: plain frozen records, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass

SERIES: tuple[str, ...] = (
    "guest_mem_used",
    "guest_mem_cache",
    "guest_cpu_pct",
    "host_cpu_pct",
    "host_rss",
)
"""The history series, in the column order the rings and the stored history use."""

RANGES: dict[str, int] = {"1m": 60, "5m": 300, "10m": 600, "1h": 3600, "2h": 7200, "24h": 86400}
"""The windows a person looks at (seconds), by the name the CLI and the dashboard use."""


@dataclass(frozen=True)
class Target:
    """One running capsule to poll."""

    capsule_id: str
    envd_url: str
    token: str | None
    """Sent in envd's token header (backend/envd/protocol.py)."""
    pid: int | None
    """The VMM process, for host-side CPU and RSS; None when unknown."""


@dataclass(frozen=True)
class Sample:
    capsule_id: str
    ts: float
    """Unix time of the tick (on the sampler's 1 s grid, not the moment envd answered)."""
    healthy: bool
    """False once envd has failed `unhealthy_after` ticks in a row."""
    error: str | None
    """Why envd gave no figures this tick (also set while still counted healthy)."""
    guest_mem_used: int | None
    """Bytes: MemTotal - MemAvailable as the guest sees it."""
    guest_mem_total: int | None
    guest_mem_cache: int | None
    guest_cpu_pct: float | None
    """0..100 of all guest vCPUs over envd's last 1 s window."""
    host_cpu_pct: float | None
    """The VMM process, % of one host core (can exceed 100 with several vCPUs)."""
    host_rss: int | None
    """The VMM process's resident set, bytes."""
    host_own: int | None = None
    """Of that, what no file backs (RssAnon): its heap, TCG's code, guest pages it alone holds.
    Not a series: what a capsule costs the host is read from the latest sample."""

    def values(self) -> tuple[float | None, ...]:
        """The figures in SERIES order."""
        return (
            self.guest_mem_used,
            self.guest_mem_cache,
            self.guest_cpu_pct,
            self.host_cpu_pct,
            self.host_rss,
        )


@dataclass(frozen=True)
class SamplerStats:
    ticks: int
    """Ticks completed."""
    missed_ticks: int
    """Grid slots skipped because the previous tick was still running or the loop was late."""
    tick_p50_ms: float
    tick_p99_ms: float
    requests_per_s: float
    """envd requests over the recent window."""
    targets: int


@dataclass(frozen=True)
class Tick:
    ts: float
    samples: dict[str, Sample]
    """capsule_id -> this tick's sample, for every capsule polled in this tick."""
    stats: SamplerStats
