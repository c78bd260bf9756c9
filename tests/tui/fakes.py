"""A sampler that serves fixed data and ticks only when told, for frozen screens and for
tests that need exact numbers (sorting). It speaks the real sampler's interface and types."""

from __future__ import annotations

from collections.abc import Callable

from backend.runtime.base import BalloonStats
from backend.sampler import Sample, SamplerStats, Tick

FROZEN_NOW = 1_700_003_600.0
STATS = SamplerStats(
    ticks=120, missed_ticks=0, tick_p50_ms=3.0, tick_p99_ms=7.0, requests_per_s=3.0, targets=3
)


class FrozenSampler:
    def __init__(self, now: float = FROZEN_NOW) -> None:
        self.now = now
        self.samples: dict[str, Sample] = {}
        self.series: dict[tuple[str, str], list[tuple[float, float]]] = {}
        self.balloons: dict[str, BalloonStats] = {}
        self.stats = STATS
        self.forgotten: list[str] = []
        self._listeners: list[Callable[[Tick], None]] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def put(self, sample: Sample, history: dict[str, list[float]] | None = None) -> None:
        """`history`: series -> values one second apart, the last at `now`."""
        self.samples[sample.capsule_id] = sample
        for series, values in (history or {}).items():
            start = self.now - len(values) + 1
            self.series[(sample.capsule_id, series)] = [
                (start + i, float(v)) for i, v in enumerate(values)
            ]

    def emit(self) -> Tick:
        tick = Tick(ts=self.now, samples=dict(self.samples), stats=self.stats)
        for listener in list(self._listeners):
            listener(tick)
        return tick

    def subscribe(self, callback: Callable[[Tick], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def latest(self, capsule_id: str) -> Sample | None:
        return self.samples.get(capsule_id)

    def history(self, capsule_id: str, series: str, window_s: float) -> list[tuple[float, float]]:
        points = self.series.get((capsule_id, series), [])
        return [p for p in points if p[0] > self.now - window_s]

    def balloon(self, capsule_id: str) -> BalloonStats | None:
        return self.balloons.get(capsule_id)

    def flush(self, capsule_id: str) -> None:
        pass

    def forget(self, capsule_id: str) -> None:
        self.forgotten.append(capsule_id)


def sample(
    capsule_id: str,
    mem_used_mib: float,
    cpu_pct: float,
    ts: float = FROZEN_NOW,
    healthy: bool = True,
    error: str | None = None,
    total_mib: float = 240,
) -> Sample:
    return Sample(
        capsule_id=capsule_id,
        ts=ts,
        healthy=healthy,
        error=error,
        guest_mem_used=int(mem_used_mib * 2**20),
        guest_mem_total=int(total_mib * 2**20),
        guest_mem_cache=int(mem_used_mib * 2**19),
        guest_cpu_pct=cpu_pct,
        host_cpu_pct=cpu_pct * 1.2 + 1,
        host_rss=int((mem_used_mib + 180) * 2**20),
    )
