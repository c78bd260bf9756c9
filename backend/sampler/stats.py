"""The sampler's own cost: tick durations, missed ticks and the request rate."""

from __future__ import annotations

import math
from collections import deque

from backend.sampler.models import SamplerStats

DURATION_WINDOW = 300
"""Ticks the percentiles are taken over (5 min at 1 s)."""
RATE_WINDOW = 60
"""Ticks the request rate is averaged over."""


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


class TickStats:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.ticks = 0
        self._durations: deque[float] = deque(maxlen=DURATION_WINDOW)
        self._requests: deque[tuple[float, int]] = deque(maxlen=RATE_WINDOW)
        """(loop time the tick started, envd requests it sent)."""
        self._missed_base = 0

    def record(self, started: float, duration_s: float, requests: int) -> None:
        self.ticks += 1
        self._durations.append(duration_s)
        self._requests.append((started, requests))

    def reset(self, missed_now: int) -> None:
        """Start measuring afresh (missed ticks are counted from `missed_now` on)."""
        self.ticks = 0
        self._durations.clear()
        self._requests.clear()
        self._missed_base = missed_now

    def snapshot(self, missed: int, targets: int) -> SamplerStats:
        ordered = sorted(self._durations)
        if self._requests:
            span = self._requests[-1][0] - self._requests[0][0] + self.interval
            rate = sum(n for _, n in self._requests) / span
        else:
            rate = 0.0
        return SamplerStats(
            ticks=self.ticks,
            missed_ticks=missed - self._missed_base,
            tick_p50_ms=round(percentile(ordered, 0.50) * 1000, 3),
            tick_p99_ms=round(percentile(ordered, 0.99) * 1000, 3),
            requests_per_s=round(rate, 2),
            targets=targets,
        )
