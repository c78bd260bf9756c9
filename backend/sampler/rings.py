"""Per-capsule history in three tiers of fixed-size rings.

Tier 0 keeps every sample (10 min at 1 s), tier 1 keeps 30 s averages (2 h), tier 2 keeps
5 min averages (24 h). Each tier averages the raw samples of its own buckets (not the
averages of the tier below), so an average is exact whatever the bucket sizes. A missing
figure is NaN: it takes no part in an average and is left out of query results.

Adding a sample costs O(series) per tier; rings are preallocated float arrays, so memory
per capsule is fixed (about 55 KB for five series) however long the agent runs.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

NAN = math.nan


@dataclass(frozen=True)
class TierSpec:
    step_s: float
    """Seconds per point (tier 0: the nominal sampling interval)."""
    capacity: int

    @property
    def span_s(self) -> float:
        return self.step_s * self.capacity


TIERS: tuple[TierSpec, ...] = (TierSpec(1.0, 600), TierSpec(30.0, 240), TierSpec(300.0, 288))


def pick_tier(window_s: float, tiers: Sequence[TierSpec] = TIERS) -> int:
    """The finest tier whose span covers the window (the coarsest when none does)."""
    for index, spec in enumerate(tiers):
        if window_s <= spec.span_s:
            return index
    return len(tiers) - 1


class Ring:
    """Fixed-capacity rows of (timestamp, one float per column); the oldest is overwritten."""

    def __init__(self, capacity: int, width: int) -> None:
        if capacity <= 0 or width <= 0:
            raise ValueError("a ring needs a positive capacity and width")
        self.capacity = capacity
        self.width = width
        self._ts = array("d", bytes(8 * capacity))
        self._columns = [array("d", bytes(8 * capacity)) for _ in range(width)]
        self._head = 0
        """Index the next row is written to."""
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, ts: float, values: Sequence[float]) -> None:
        i = self._head
        self._ts[i] = ts
        for column, value in zip(self._columns, values, strict=True):
            column[i] = value
        self._head = (i + 1) % self.capacity
        if self._len < self.capacity:
            self._len += 1

    def _indices(self) -> Iterator[int]:
        """Row indices, oldest first."""
        first = (self._head - self._len) % self.capacity
        for offset in range(self._len):
            yield (first + offset) % self.capacity

    def timestamps(self) -> list[float]:
        return [self._ts[i] for i in self._indices()]

    def column(self, index: int) -> list[float]:
        column = self._columns[index]
        return [column[i] for i in self._indices()]

    def points(self, index: int, since: float) -> list[tuple[float, float]]:
        """(ts, value) of one column with ts >= since, oldest first, NaN left out."""
        column, stamps, capacity = self._columns[index], self._ts, self.capacity
        out: list[tuple[float, float]] = []
        # Newest first and stop at the first older row: a dashboard asking for the last
        # minute of many capsules every second pays for the minute, not the whole ring.
        # (Rows are in time order; after a wall-clock step back the older part is cut off.)
        i = self._head
        for _ in range(self._len):
            i = (i - 1) % capacity
            ts = stamps[i]
            if ts < since:
                break
            value = column[i]
            if not math.isnan(value):
                out.append((ts, value))
        out.reverse()
        return out

    @property
    def last_ts(self) -> float | None:
        return self._ts[(self._head - 1) % self.capacity] if self._len else None


class Bucket:
    """The running sums of one roll-up bucket that has not closed yet."""

    def __init__(self, width: int) -> None:
        self.index: int | None = None
        """floor(ts / step) of the samples summed so far; None when empty."""
        self.sums = [0.0] * width
        self.counts = [0] * width

    def add(self, values: Sequence[float]) -> None:
        sums, counts = self.sums, self.counts
        for i, value in enumerate(values):
            if not math.isnan(value):
                sums[i] += value
                counts[i] += 1

    def averages(self) -> list[float]:
        return [s / c if c else NAN for s, c in zip(self.sums, self.counts, strict=True)]

    def reset(self, index: int | None) -> None:
        self.index = index
        width = len(self.sums)
        self.sums = [0.0] * width
        self.counts = [0] * width


class TieredHistory:
    """The samples of one capsule in every tier."""

    def __init__(self, width: int, tiers: Sequence[TierSpec] = TIERS) -> None:
        self.width = width
        self.tiers = tuple(tiers)
        self.rings = [Ring(spec.capacity, width) for spec in self.tiers]
        self.buckets = [Bucket(width) for _ in self.tiers[1:]]
        """The open bucket of each roll-up tier (tiers[1:])."""

    def add(self, ts: float, values: Sequence[float | None]) -> None:
        row = [NAN if v is None else float(v) for v in values]
        self.rings[0].append(ts, row)
        for spec, ring, bucket in zip(self.tiers[1:], self.rings[1:], self.buckets, strict=True):
            index = math.floor(ts / spec.step_s)
            if index != bucket.index:
                # Any change of bucket closes the open one, also when the wall clock stepped
                # back: a point out of order is better than samples folded into a wrong one.
                self._close(spec, ring, bucket)
                bucket.reset(index)
            bucket.add(row)

    @staticmethod
    def _close(spec: TierSpec, ring: Ring, bucket: Bucket) -> None:
        if bucket.index is not None and any(bucket.counts):
            ring.append(bucket.index * spec.step_s, bucket.averages())

    def points(
        self, column: int, window_s: float, now: float, tier: int | None = None
    ) -> list[tuple[float, float]]:
        """(ts, value) within [now - window_s, ...] from the tier that fits the window.

        Roll-up points are stamped with their bucket's start; the open bucket is included as
        its average so far, so a coarse view still reaches the present.
        """
        index = pick_tier(window_s, self.tiers) if tier is None else tier
        since = now - window_s
        out = self.rings[index].points(column, since)
        if index > 0:
            spec, bucket = self.tiers[index], self.buckets[index - 1]
            if bucket.index is not None and bucket.counts[column]:
                ts = bucket.index * spec.step_s
                if ts >= since:
                    out.append((ts, bucket.sums[column] / bucket.counts[column]))
        return out

    @property
    def last_ts(self) -> float | None:
        return self.rings[0].last_ts

    def __len__(self) -> int:
        return len(self.rings[0])
