"""Tier roll-ups: averages, capacities, windows, gaps, tier choice."""

from __future__ import annotations

import math

import pytest

from backend.sampler.rings import TIERS, Ring, TieredHistory, TierSpec, pick_tier

T0 = 1_800_000_000.0  # a multiple of 300: bucket boundaries fall on round offsets


def test_tier_sizes_are_the_windows_people_look_at() -> None:
    assert [(t.step_s, t.capacity) for t in TIERS] == [(1.0, 600), (30.0, 240), (300.0, 288)]
    assert [t.span_s for t in TIERS] == [600, 7200, 86400]


@pytest.mark.parametrize(
    ("window", "tier"),
    [(60, 0), (300, 0), (600, 0), (601, 1), (3600, 1), (7200, 1), (7201, 2), (86400, 2),
     (10**6, 2)],
)  # fmt: skip
def test_a_window_picks_the_finest_tier_covering_it(window: int, tier: int) -> None:
    assert pick_tier(window) == tier


def test_ring_overwrites_the_oldest_and_reads_oldest_first() -> None:
    ring = Ring(3, 2)
    for i in range(5):
        ring.append(float(i), [i * 10.0, -i])
    assert len(ring) == 3
    assert ring.timestamps() == [2.0, 3.0, 4.0]
    assert ring.column(0) == [20.0, 30.0, 40.0]
    assert ring.points(1, since=3.0) == [(3.0, -3.0), (4.0, -4.0)]
    assert ring.last_ts == 4.0


def test_raw_tier_keeps_the_last_600_samples() -> None:
    history = TieredHistory(1)
    for i in range(1000):
        history.add(T0 + i, [float(i)])
    raw = history.rings[0]
    assert len(raw) == 600
    assert raw.timestamps()[0] == T0 + 400
    assert raw.column(0)[-1] == 999.0


def test_30s_tier_holds_bucket_averages_of_raw_samples() -> None:
    history = TieredHistory(2)
    for i in range(95):  # three full 30 s buckets and a 5 s open one
        history.add(T0 + i, [float(i), 7.0])
    tier1 = history.rings[1]
    assert tier1.timestamps() == [T0, T0 + 30, T0 + 60]
    assert tier1.column(0) == [14.5, 44.5, 74.5]  # mean of 0..29, 30..59, 60..89
    assert tier1.column(1) == [7.0, 7.0, 7.0]
    # The open bucket (90..94) is part of a query, at its bucket start.
    assert history.points(0, 3600, now=T0 + 95)[-1] == (T0 + 90, 92.0)


def test_5min_tier_averages_the_raw_samples_not_the_30s_averages() -> None:
    history = TieredHistory(1)
    # Uneven buckets: 10 samples of 0 in the first 30 s, 290 samples of 100 in the rest.
    for i in range(10):
        history.add(T0 + i, [0.0])
    for i in range(10, 300):
        history.add(T0 + i, [100.0])
    history.add(T0 + 300, [0.0])  # closes the first 5 min bucket
    (value,) = history.rings[2].column(0)
    assert value == pytest.approx(100.0 * 290 / 300)


def test_missing_values_take_no_part_in_averages_and_are_not_returned() -> None:
    history = TieredHistory(2)
    for i in range(30):
        history.add(T0 + i, [None if i % 2 else 10.0, None])
    history.add(T0 + 30, [None, None])
    assert history.rings[1].column(0) == [10.0]
    assert math.isnan(history.rings[1].column(1)[0])
    assert history.points(1, 3600, now=T0 + 31) == []
    assert len(history.points(0, 60, now=T0 + 31)) == 15


def test_roll_up_tiers_are_capped_at_2h_and_24h() -> None:
    history = TieredHistory(1)
    for i in range(30 * 3600 // 30):  # 30 h of one sample every 30 s
        history.add(T0 + 30 * i, [float(i)])
    assert len(history.rings[1]) == 240
    assert len(history.rings[2]) == 288
    stamps = history.rings[2].timestamps()
    assert stamps[-1] - stamps[0] == 287 * 300


def test_windows_return_only_recent_points_from_the_right_tier() -> None:
    history = TieredHistory(1)
    for i in range(3 * 3600):
        history.add(T0 + i, [float(i)])
    now = T0 + 3 * 3600
    one_minute = history.points(0, 60, now)
    assert [ts for ts, _ in one_minute] == [now - 60 + k for k in range(60)]
    one_hour = history.points(0, 3600, now)
    assert len(one_hour) == 120  # 30 s points (the open bucket is empty at a boundary)
    assert all((ts - T0) % 30 == 0 for ts, _ in one_hour)
    day = history.points(0, 86400, now)
    assert len(day) == 36  # 3 h of 5 min averages
    # The same window picked explicitly from another tier.
    assert len(history.points(0, 60, now, tier=1)) == 2


def test_a_gap_closes_buckets_without_inventing_points() -> None:
    history = TieredHistory(1)
    for i in range(20):
        history.add(T0 + i, [1.0])
    for i in range(20):  # a pause of an hour
        history.add(T0 + 3600 + i, [3.0])
    assert history.rings[1].timestamps() == [T0]
    assert [v for _, v in history.points(0, 7200, now=T0 + 3620)] == [1.0, 3.0]


def test_custom_tiers() -> None:
    history = TieredHistory(1, (TierSpec(1, 5), TierSpec(2, 3)))
    for i in range(10):
        history.add(float(i), [float(i)])
    assert history.rings[1].column(0) == [2.5, 4.5, 6.5]  # the oldest, 0.5, was overwritten
    assert history.points(0, 6, now=10.0, tier=1)[-1] == (8.0, 8.5)  # the open bucket
