"""What the dashboard needs from the metrics sampler: `backend.sampler.Sampler` in the app, a
frozen stand-in in screenshot tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from backend.sampler import BalloonStats, Sample, SamplerStats, Tick


class MetricsSampler(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def subscribe(self, callback: Callable[[Tick], None]) -> Callable[[], None]: ...

    def latest(self, capsule_id: str) -> Sample | None: ...

    def history(
        self, capsule_id: str, series: str, window_s: float
    ) -> list[tuple[float, float]]: ...

    def balloon(self, capsule_id: str) -> BalloonStats | None: ...

    def forget(self, capsule_id: str) -> None: ...

    @property
    def stats(self) -> SamplerStats: ...
