"""The stored form of a capsule's history: compact JSON for Store.put_metrics.

Timestamps are integer milliseconds, the first absolute and the rest as deltas (on a 1 s grid
almost all are the same short number); values are rounded per series (bytes to integers,
percentages to 0.01); a missing value is null. Tiers and series are matched by step and name
on load, so adding a series or resizing a tier keeps what was stored. About 60 KB per capsule
with full rings.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from typing import Any

from backend.sampler.rings import NAN, TieredHistory

log = logging.getLogger("wrenn.sampler")

VERSION = 1
DECIMALS: dict[str, int] = {"guest_cpu_pct": 2, "host_cpu_pct": 2}
"""Digits kept after the point; series not listed are byte counts, kept as integers."""


class HistoryFormatError(ValueError):
    """The stored text is not a history this version can read."""


def _number(value: float, decimals: int) -> int | float | None:
    if math.isnan(value) or math.isinf(value):
        return None
    if decimals == 0:
        return round(value)
    rounded = round(value, decimals)
    return int(rounded) if rounded.is_integer() else rounded


def _encode_ts(stamps: Sequence[float]) -> list[int]:
    out: list[int] = []
    previous = 0
    for ts in stamps:
        ms = round(ts * 1000)
        out.append(ms - previous)
        previous = ms
    return out


def _decode_ts(deltas: Sequence[Any]) -> list[float]:
    out: list[float] = []
    ms = 0
    for delta in deltas:
        ms += int(delta)
        out.append(ms / 1000)
    return out


def encode(history: TieredHistory, series: Sequence[str]) -> str:
    if len(series) != history.width:
        raise ValueError(f"{len(series)} series names for a history of {history.width}")
    decimals = [DECIMALS.get(name, 0) for name in series]
    tiers: list[dict[str, Any]] = []
    for spec, ring in zip(history.tiers, history.rings, strict=True):
        tiers.append(
            {
                "step": spec.step_s,
                "ts": _encode_ts(ring.timestamps()),
                "cols": [
                    [_number(v, decimals[i]) for v in ring.column(i)] for i in range(ring.width)
                ],
            }
        )
    buckets = [
        {"step": spec.step_s, "index": b.index, "sums": b.sums, "counts": b.counts}
        for spec, b in zip(history.tiers[1:], history.buckets, strict=True)
        if b.index is not None
    ]
    document = {"v": VERSION, "series": list(series), "tiers": tiers, "open": buckets}
    return json.dumps(document, separators=(",", ":"), allow_nan=False)


def decode(text: str, history: TieredHistory, series: Sequence[str]) -> None:
    """Fill an empty `history` (built for `series`) from stored text.

    Raises HistoryFormatError when the text is not a readable history; `history` is then
    left as it was.
    """
    try:
        document = json.loads(text)
        if not isinstance(document, dict) or document.get("v") != VERSION:
            raise HistoryFormatError(f"not a version {VERSION} history")
        stored_series = [str(name) for name in document["series"]]
        # By name, so a series added or dropped since the flush costs only its own column.
        columns = {j: series.index(name) for j, name in enumerate(stored_series) if name in series}
        rows_by_tier: dict[int, list[tuple[float, list[float]]]] = {}
        for tier in document["tiers"]:
            index = _tier_index(history, float(tier["step"]))
            if index is None:
                continue
            stamps = _decode_ts(tier["ts"])
            cols = tier["cols"]
            if len(cols) != len(stored_series) or any(len(c) != len(stamps) for c in cols):
                raise HistoryFormatError("columns and timestamps differ in length")
            rows: list[tuple[float, list[float]]] = []
            for r, ts in enumerate(stamps):
                row = [NAN] * history.width
                for j, i in columns.items():
                    value = cols[j][r]
                    row[i] = NAN if value is None else float(value)
                rows.append((ts, row))
            rows_by_tier[index] = rows
        open_buckets: list[tuple[int, int, list[float], list[int]]] = []
        for bucket in document.get("open", []):
            index = _tier_index(history, float(bucket["step"]))
            if index is None or index == 0:
                continue
            sums = [0.0] * history.width
            counts = [0] * history.width
            for j, i in columns.items():
                sums[i] = float(bucket["sums"][j])
                counts[i] = int(bucket["counts"][j])
            open_buckets.append((index, int(bucket["index"]), sums, counts))
    except HistoryFormatError:
        raise
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise HistoryFormatError(f"unreadable history: {exc!r}") from exc
    for index, rows in rows_by_tier.items():
        ring = history.rings[index]
        for ts, row in rows[-ring.capacity :]:
            ring.append(ts, row)
    for index, bucket_index, sums, counts in open_buckets:
        bucket = history.buckets[index - 1]
        bucket.reset(bucket_index)
        bucket.sums, bucket.counts = sums, counts


def _tier_index(history: TieredHistory, step: float) -> int | None:
    for index, spec in enumerate(history.tiers):
        if spec.step_s == step:
            return index
    return None
