"""The stored form of a history: round trip, compactness, bad input."""

from __future__ import annotations

import json
import math
import random

import pytest

from backend.sampler import SERIES
from backend.sampler.history_codec import HistoryFormatError, decode, encode
from backend.sampler.rings import TieredHistory

T0 = 1_800_000_000.0


def full_history(seconds: int = 3 * 3600) -> TieredHistory:
    rng = random.Random(5)
    history = TieredHistory(len(SERIES))
    for i in range(seconds):
        history.add(
            T0 + i,
            [
                rng.randrange(100 << 20, 200 << 20),
                rng.randrange(10 << 20, 20 << 20),
                None if i % 97 == 0 else round(rng.uniform(0, 100), 2),
                round(rng.uniform(0, 300), 2),
                rng.randrange(300 << 20, 400 << 20),
            ],
        )
    return history


def same(a: float, b: float, tolerance: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tolerance


def test_round_trip_keeps_every_tier_and_the_open_buckets() -> None:
    original = full_history()
    original.add(T0 + 3 * 3600 + 0.5, [1, 2, 3.25, 4.5, 5])  # an off-grid stamp
    restored = TieredHistory(len(SERIES))
    decode(encode(original, SERIES), restored, SERIES)
    for ring_a, ring_b in zip(original.rings, restored.rings, strict=True):
        assert ring_b.timestamps() == pytest.approx(ring_a.timestamps(), abs=1e-3)
        for i, name in enumerate(SERIES):
            tolerance = 0.005 if name.endswith("_pct") else 0.5
            assert all(
                same(a, b, tolerance)
                for a, b in zip(ring_a.column(i), ring_b.column(i), strict=True)
            )
    for bucket_a, bucket_b in zip(original.buckets, restored.buckets, strict=True):
        assert (bucket_a.index, bucket_a.counts) == (bucket_b.index, bucket_b.counts)
        assert bucket_b.sums == pytest.approx(bucket_a.sums)
    now = T0 + 3 * 3600 + 1
    for window in (60, 3600, 86400):
        assert len(restored.points(0, window, now)) == len(original.points(0, window, now))


def test_encoding_is_compact() -> None:
    text = encode(full_history(), SERIES)
    assert len(text) < 80_000
    document = json.loads(text)
    assert set(document["tiers"][0]["ts"][1:]) == {1000}  # 1 s deltas in ms


def test_series_are_matched_by_name() -> None:
    original = TieredHistory(2)
    for i in range(5):
        original.add(T0 + i, [float(i), 100.0 + i])
    text = encode(original, ["host_rss", "gone_series"])
    restored = TieredHistory(3)
    decode(text, restored, ["guest_cpu_pct", "host_rss", "new_series"])
    assert restored.rings[0].column(1) == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert all(math.isnan(v) for v in restored.rings[0].column(0) + restored.rings[0].column(2))


def test_more_rows_than_the_ring_holds_keeps_the_newest() -> None:
    original = TieredHistory(1)
    for i in range(600):
        original.add(T0 + i, [float(i)])
    from backend.sampler.rings import TierSpec

    small = TieredHistory(1, (TierSpec(1, 10), TierSpec(30, 5), TierSpec(300, 5)))
    decode(encode(original, ["x"]), small, ["x"])
    assert small.rings[0].column(0) == [float(i) for i in range(590, 600)]


@pytest.mark.parametrize(
    "text",
    ["", "not json", "[]", '{"v": 99}', '{"v": 1, "series": ["a"], "tiers": [{"step": 1}]}',
     '{"v": 1, "series": ["a"], "tiers": [{"step": 1, "ts": [1, 2], "cols": [[1]]}]}'],
)  # fmt: skip
def test_unreadable_text_is_refused_and_leaves_the_history_alone(text: str) -> None:
    history = TieredHistory(1)
    history.add(T0, [1.0])
    with pytest.raises(HistoryFormatError):
        decode(text, history, ["a"])
    assert history.rings[0].column(0) == [1.0]
