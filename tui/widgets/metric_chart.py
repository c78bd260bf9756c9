"""A time-series chart (plotext) of a few series over the last window, newest at the right."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual_plotext import PlotextPlot

Points = Sequence[tuple[float, float]]


@dataclass(frozen=True)
class Series:
    label: str
    points: Points
    color: str


def time_unit(window_s: float) -> tuple[float, str]:
    """Seconds per x unit and its name: hours for a day, minutes below that."""
    return (3600.0, "hours ago") if window_s > 2 * 3600 else (60.0, "minutes ago")


def downsample(points: Points, buckets: int) -> list[tuple[float, float]]:
    """Average into at most `buckets` equal time slices; a terminal column shows one anyway."""
    if len(points) <= buckets or buckets <= 0:
        return list(points)
    start, end = points[0][0], points[-1][0]
    span = (end - start) or 1.0
    sums: dict[int, tuple[float, float, int]] = {}
    for ts, value in points:
        index = min(buckets - 1, int((ts - start) / span * buckets))
        t, v, n = sums.get(index, (0.0, 0.0, 0))
        sums[index] = (t + ts, v + value, n + 1)
    return [(t / n, v / n) for t, v, n in (sums[i] for i in sorted(sums))]


class MetricChart(PlotextPlot):
    def __init__(self, title: str, unit: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title = title
        self.unit = unit

    def plot(
        self, series: Sequence[Series], now: float, window_s: float, ceiling: float | None
    ) -> None:
        plt = self.plt
        plt.clear_data()
        scale, unit_name = time_unit(window_s)
        width = max(self.size.width, 40)
        drawn = False
        for line in series:
            points = downsample([p for p in line.points if p[0] >= now - window_s], width * 2)
            if not points:
                continue
            xs = [(ts - now) / scale for ts, _ in points]
            ys = [value for _, value in points]
            plt.plot(xs, ys, label=line.label, color=line.color, marker="braille")
            drawn = True
        plt.title(self.title if drawn else f"{self.title} (no samples yet)")
        plt.xlabel(unit_name)
        plt.ylabel(self.unit)
        plt.xlim(-window_s / scale, 0)
        top = ceiling if ceiling else None
        if top:
            plt.ylim(0, top)
        self.refresh()
