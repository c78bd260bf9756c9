"""The fixed-rate clock: on the grid, never overlapping, missed slots counted."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from backend.sampler.clock import FixedRateClock

INTERVAL = 0.1
SLOTS = 13
"""Running for 12.5 intervals brings slots 0..12 due."""


class Recorder:
    def __init__(self, work: float = 0.0, slow_call: int | None = None) -> None:
        self.work = work
        self.slow_call = slow_call
        """Only this call (0-based) does the work; every call does when None."""
        self.started: list[tuple[int, float]] = []
        self.active = 0
        self.max_active = 0

    async def __call__(self, k: int) -> None:
        call = len(self.started)
        self.started.append((k, asyncio.get_running_loop().time()))
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.slow_call is None or call == self.slow_call:
                await asyncio.sleep(self.work)
        finally:
            self.active -= 1

    @property
    def slots(self) -> list[int]:
        return [k for k, _ in self.started]


async def run(clock: FixedRateClock, seconds: float = (SLOTS - 0.5) * INTERVAL) -> None:
    clock.start()
    await asyncio.sleep(seconds)
    await clock.stop()


def assert_in_own_slot(clock: FixedRateClock, rec: Recorder) -> None:
    """Each tick starts inside its grid slot: lateness never accumulates (a clock that sleeps
    an interval after the work drifts out of its slot within a few ticks)."""
    for k, at in rec.started:
        assert clock.deadline(k) - 0.005 <= at < clock.deadline(k + 1), (k, at - clock.deadline(k))


def assert_every_slot_accounted(clock: FixedRateClock, rec: Recorder) -> None:
    assert rec.slots == sorted(set(rec.slots))
    assert len(rec.slots) + clock.missed == SLOTS
    assert clock.started == len(rec.slots)


async def test_ticks_start_on_the_grid_however_long_the_work() -> None:
    rec = Recorder(work=0.6 * INTERVAL)
    clock = FixedRateClock(INTERVAL, rec)
    await run(clock)
    assert_in_own_slot(clock, rec)
    assert_every_slot_accounted(clock, rec)
    assert clock.missed <= 1  # none on a quiet machine; a heavily loaded one may lose one


async def test_a_slow_tick_skips_slots_and_never_overlaps() -> None:
    rec = Recorder(work=2.5 * INTERVAL)
    clock = FixedRateClock(INTERVAL, rec)
    await run(clock)
    assert rec.max_active == 1
    # A 2.5-interval tick holds slots k+1 and k+2: the next tick can start at k+3 at best.
    assert all(b - a >= 3 for a, b in itertools.pairwise(rec.slots)), rec.slots
    assert len(rec.slots) >= 4
    assert_in_own_slot(clock, rec)
    assert_every_slot_accounted(clock, rec)


async def test_one_slow_tick_then_back_on_the_grid() -> None:
    rec = Recorder(work=3.5 * INTERVAL, slow_call=2)
    clock = FixedRateClock(INTERVAL, rec)
    await run(clock)
    slow, after = rec.slots[2], rec.slots[3]
    assert after >= slow + 4  # the three slots it overran were skipped, not run late
    assert clock.missed >= 3
    assert len(rec.slots) >= 8
    assert_in_own_slot(clock, rec)
    assert_every_slot_accounted(clock, rec)


async def test_a_blocked_loop_counts_the_slots_it_swallowed() -> None:
    rec = Recorder()
    clock = FixedRateClock(INTERVAL, rec)
    clock.start()
    await asyncio.sleep(2.5 * INTERVAL)
    time.sleep(4 * INTERVAL)  # nothing runs while slots 3..6 come due
    await asyncio.sleep(6 * INTERVAL)
    await clock.stop()
    # Unblocked at 6.5 intervals: slot 3's timer finds slots 3..5 gone and runs slot 6.
    assert not {3, 4, 5} & set(rec.slots), rec.slots
    assert 6 in rec.slots or 7 in rec.slots
    assert clock.missed >= 3
    assert_in_own_slot(clock, rec)
    assert len(rec.slots) + clock.missed == SLOTS


async def test_stop_waits_for_the_tick_in_progress_and_ends_ticking() -> None:
    rec = Recorder(work=0.1)
    clock = FixedRateClock(INTERVAL, rec)
    clock.start()
    await asyncio.sleep(0.01)
    await clock.stop()
    assert rec.active == 0
    count = len(rec.started)
    await asyncio.sleep(3 * INTERVAL)
    assert len(rec.started) == count == 1


def test_interval_must_be_positive() -> None:
    async def nothing(k: int) -> None:
        return None

    with pytest.raises(ValueError):
        FixedRateClock(0, nothing)
