"""Sparklines as Rich Text for DataTable cells: one block character per second of history.

Points are placed by their age rather than their index, so a missed tick or a paused capsule
shows as a gap instead of squeezing the line together.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from rich.text import Text

BLOCKS = "▁▂▃▄▅▆▇█"
GAP = " "
WARN_FRACTION = 0.75
ALERT_FRACTION = 0.9


def level_style(fraction: float) -> str:
    if fraction >= ALERT_FRACTION:
        return "red"
    if fraction >= WARN_FRACTION:
        return "yellow"
    return "green"


def sparkline(
    points: Sequence[tuple[float, float]],
    now: float,
    width: int,
    ceiling: float | None = None,
    step_s: float = 1.0,
) -> Text:
    """`points` are (ts, value) oldest first; `ceiling` is the value drawn as a full block
    (default: the largest value shown, so a flat line still reads as a level)."""
    slots: list[float | None] = [None] * width
    last = width - 1
    for ts, value in reversed(points):
        index = last - round((now - ts) / step_s)
        if index < 0:
            break
        if index <= last and slots[index] is None:
            slots[index] = value
    shown = [v for v in slots if v is not None]
    if not shown:
        return Text(GAP * width)
    top = ceiling if ceiling is not None and ceiling > 0 else max(max(shown), 1e-9)
    scale = len(BLOCKS) / top
    top_block = len(BLOCKS) - 1
    chars = "".join(
        GAP if v is None else BLOCKS[min(top_block, max(0, int(v * scale)))] for v in slots
    )
    latest = next(v for v in reversed(slots) if v is not None)
    style = level_style(latest / top) if ceiling else "cyan"
    return Text(chars, style=style)


class SparkHistory:
    """The last `length` points of a few series per capsule, fed from the sampler's ticks.

    Appending a tick's samples is O(capsules); asking the sampler for every capsule's history
    on every tick instead would rescan its rings each second. A capsule seen for the first time
    is seeded once from the sampler's own history (`seed`), so a restarted dashboard or a
    resumed capsule does not start with an empty line.
    """

    def __init__(self, series: Sequence[str], length: int) -> None:
        self.series = tuple(series)
        self.length = length
        self._points: dict[str, dict[str, deque[tuple[float, float]]]] = {}

    def __contains__(self, capsule_id: str) -> bool:
        return capsule_id in self._points

    def seed(self, capsule_id: str, history: dict[str, Sequence[tuple[float, float]]]) -> None:
        self._points[capsule_id] = {
            name: deque(history.get(name, ()), maxlen=self.length) for name in self.series
        }

    def add(self, capsule_id: str, ts: float, values: dict[str, float | None]) -> None:
        lines = self._points.get(capsule_id)
        if lines is None:
            return
        for name, line in lines.items():
            value = values.get(name)
            if value is not None and (not line or line[-1][0] < ts):
                line.append((ts, float(value)))

    def points(self, capsule_id: str, series: str) -> Sequence[tuple[float, float]]:
        lines = self._points.get(capsule_id)
        return lines[series] if lines is not None else ()

    def keep(self, capsule_ids: set[str]) -> None:
        for gone in self._points.keys() - capsule_ids:
            del self._points[gone]
