"""Stats and usage come from reservations recorded while the API runs: what a capsule
reserved over an interval is charged to the day it was in."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from backend.api.wrenn.observe import RECORD_INTERVAL_S, Reservations


def test_minutes_and_peaks_per_day() -> None:
    day_start = datetime(2026, 5, 1, tzinfo=UTC).timestamp()
    r = Reservations()
    r.record(day_start, running=1, vcpus=2, memory_mb=512)
    r.record(day_start + 5, running=2, vcpus=3, memory_mb=768)
    r.record(day_start + 10, running=0, vcpus=0, memory_mb=0)
    minutes = r.daily_minutes[datetime(2026, 5, 1, tzinfo=UTC).date()]
    # 5 s at the first reservation, then 5 s at the second
    assert minutes[0] == pytest.approx((2 * 5 + 3 * 5) / 60)
    assert minutes[1] == pytest.approx((512 * 5 + 768 * 5) / 60)
    assert r.daily_peaks[datetime(2026, 5, 1, tzinfo=UTC).date()] == [2, 3, 768]


def test_a_gap_is_not_charged_in_full() -> None:
    """After the agent was stopped for an hour, only up to two intervals are charged."""
    r = Reservations()
    r.record(1_000_000.0, running=1, vcpus=1, memory_mb=256)
    r.record(1_000_000.0 + 3600, running=1, vcpus=1, memory_mb=256)
    ((cpu, _),) = r.daily_minutes.values()
    assert cpu == pytest.approx(2 * RECORD_INTERVAL_S / 60)
