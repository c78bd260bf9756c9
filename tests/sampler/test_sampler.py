"""The sampler with fake sources: scheduling, isolation, health, balloon, subscriptions."""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from backend.runtime.base import BalloonStats
from backend.sampler import ManagerSource, Sampler, Target, Tick
from tests.hostenvd import free_port
from tests.sampler.conftest import HostEnvd
from tests.sampler.helpers import FakeSource, put_capsule


async def collect(sampler: Sampler, n: int, timeout: float = 10.0) -> list[Tick]:
    """Start the sampler, keep the first n ticks, stop it."""
    ticks: list[Tick] = []
    done = asyncio.Event()

    def on_tick(tick: Tick) -> None:
        ticks.append(tick)
        if len(ticks) >= n:
            done.set()

    sampler.subscribe(on_tick)
    await sampler.start()
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await sampler.stop()
    return ticks[:n]


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def slots(ticks: list[Tick], interval: float) -> list[int]:
    """Each tick's grid slot, checking its timestamp lies exactly on the grid."""
    out = []
    for tick in ticks:
        k = (tick.ts - ticks[0].ts) / interval
        assert abs(k - round(k)) * interval < 1e-5, f"tick at {tick.ts} is off the grid"
        out.append(round(k))
    return out


def refused_target(capsule_id: str, pid: int | None = None) -> Target:
    return Target(capsule_id, f"http://127.0.0.1:{free_port()}", None, pid)


async def test_a_silent_capsule_turns_unhealthy_while_the_others_stay_on_time(
    start_envds: Callable[[int], list[HostEnvd]], silent_port: int
) -> None:
    a, b = start_envds(2)
    dead = Target("cl-dead", f"http://127.0.0.1:{silent_port}", None, None)
    source = FakeSource([a.target("cl-a"), b.target("cl-b"), dead])
    sampler = Sampler(source, interval=0.5, request_timeout=0.2)
    ticks = await collect(sampler, 5)
    assert slots(ticks, 0.5) == [0, 1, 2, 3, 4]
    for n, tick in enumerate(ticks):
        assert set(tick.samples) == {"cl-a", "cl-b", "cl-dead"}
        for live in ("cl-a", "cl-b"):
            sample = tick.samples[live]
            assert sample.healthy and sample.error is None
            assert sample.guest_mem_used is not None and sample.guest_mem_used > 0
        silent = tick.samples["cl-dead"]
        assert silent.guest_mem_used is None
        assert silent.error == "no answer within 0.2 s"
        assert silent.healthy == (n < 2), n  # unhealthy from the third failure on
    stats = sampler.stats
    assert stats.missed_ticks == 0
    assert 150 <= stats.tick_p50_ms < 450  # bounded by the 0.2 s timeout, not the silence
    assert sampler.latest("cl-dead") == ticks[-1].samples["cl-dead"]


async def test_a_capsule_recovers_when_envd_answers_again(
    start_envds: Callable[[int], list[HostEnvd]],
) -> None:
    (envd,) = start_envds(1)
    source = FakeSource([refused_target("cl-x")])
    sampler = Sampler(source, interval=0.1, request_timeout=0.2, unhealthy_after=2)
    seen: list[tuple[bool, str | None]] = []

    def on_tick(tick: Tick) -> None:
        sample = tick.samples["cl-x"]
        seen.append((sample.healthy, sample.error))
        if len(seen) == 3:
            source.current = [envd.target("cl-x")]  # resumed on another port

    sampler.subscribe(on_tick)
    await sampler.start()
    await until(lambda: len(seen) >= 6)
    await sampler.stop()
    assert seen[0][0] and seen[0][1] is not None and seen[0][1].startswith("cannot connect")
    assert not seen[1][0] and not seen[2][0]
    assert seen[-1] == (True, None)


async def test_a_slow_source_keeps_ticks_on_the_grid_and_counts_the_missed() -> None:
    source = FakeSource([])
    interval = 0.1
    sampler = Sampler(source, interval=interval)

    def on_tick(tick: Tick) -> None:
        if len(ticks) == 3:
            source.targets_delay = 0.35  # blocks the loop from inside tick 3
        else:
            source.targets_delay = 0.0

    ticks: list[Tick] = []
    sampler.subscribe(ticks.append)
    sampler.subscribe(on_tick)
    await sampler.start()
    await asyncio.sleep(1.2)
    await sampler.stop()
    ks = slots(ticks, interval)
    assert ks == sorted(set(ks))
    gaps = [b - a for a, b in itertools.pairwise(ks)]
    assert max(gaps) >= 3, ks  # the slots the blocked loop swallowed were skipped, not bunched
    stats = sampler.stats
    assert stats.missed_ticks == ks[-1] + 1 - len(ks) >= 2
    assert stats.ticks == len(ks)


async def test_requests_slower_than_the_interval_never_overlap(silent_port: int) -> None:
    interval = 0.1
    source = FakeSource([Target("cl-slow", f"http://127.0.0.1:{silent_port}", None, None)])
    sampler = Sampler(source, interval=interval, request_timeout=0.25)
    ticks = await collect(sampler, 4)
    ks = slots(ticks, interval)
    assert ks == [0, 3, 6, 9]  # each 0.25 s tick covers its slot and the next two
    assert sampler.stats.missed_ticks >= 6


async def test_host_figures_come_from_the_vmm_process_after_priming() -> None:
    me = os.getpid()
    sampler = Sampler(FakeSource([refused_target("cl-h", pid=me)]), interval=0.05)
    ticks = await collect(sampler, 3)
    first, second = ticks[0].samples["cl-h"], ticks[1].samples["cl-h"]
    assert first.host_cpu_pct is None  # cpu_percent's first call only primes it
    assert second.host_cpu_pct is not None and second.host_cpu_pct >= 0
    assert second.host_rss is not None and second.host_rss > 10 << 20
    history = sampler.history("cl-h", "host_rss", 60)
    assert [ts for ts, _ in history] == [t.ts for t in ticks]
    assert sampler.history("cl-h", "guest_mem_used", 60) == []  # envd never answered


async def test_balloon_stats_are_read_every_balloon_interval_staggered() -> None:
    ticks: list[Tick] = []
    reads: list[tuple[str, int]] = []  # (capsule, slot of the last published tick)

    class Recording(FakeSource):
        async def balloon_stats(self, capsule_id: str) -> BalloonStats | None:
            reads.append((capsule_id, slots(ticks, 0.05)[-1]))
            return self.balloon_answer

    source = Recording([refused_target(f"cl-{i}") for i in range(5)])
    sampler = Sampler(source, interval=0.05, balloon_interval=0.25, request_timeout=0.04)
    sampler.subscribe(ticks.append)
    await sampler.start()
    while len(ticks) < 11:
        await asyncio.sleep(0.01)
    await sampler.stop()
    # A read starts right after its tick is published (slots 0-9 have all started once the
    # eleventh tick is out). A tick the loaded machine ran too late
    # for is skipped, with its reads: count the slots that were published, not the ticks.
    published = [k for k in slots(ticks, 0.05) if k < 10]
    by_slot: dict[int, list[str]] = {}
    for capsule_id, k in reads:
        if k < 10:
            by_slot.setdefault(k, []).append(capsule_id)
    # One capsule per tick rather than all five at once, at every tick that was published...
    assert sorted(by_slot) == published
    assert all(len(read) == 1 for read in by_slot.values())
    # ...each capsule once per 5 ticks, on its own offset.
    offset: dict[str, int] = {}
    for k, (capsule_id,) in sorted(by_slot.items()):
        assert offset.setdefault(capsule_id, k % 5) == k % 5
    assert sorted(offset.values()) == sorted(set(offset.values()))
    assert len(offset) == 5 or len(published) < 9
    assert sampler.balloon("cl-0") == source.balloon_answer
    assert sampler.balloon("cl-unknown") is None


async def test_a_hanging_balloon_read_delays_no_tick() -> None:
    class HangingBalloon(FakeSource):
        in_flight = 0
        most_in_flight = 0

        async def balloon_stats(self, capsule_id: str) -> BalloonStats | None:
            self.balloon_calls.append(capsule_id)
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            try:
                await asyncio.sleep(3600)
            finally:
                self.in_flight -= 1
            return None

    source = HangingBalloon([refused_target("cl-b")])
    # A read every 2 ticks, each cut off after balloon_interval (4 ticks).
    sampler = Sampler(source, interval=0.1, balloon_interval=0.4, request_timeout=0.05)
    ticks = await collect(sampler, 12)
    assert slots(ticks, 0.1) == list(range(12))
    assert source.most_in_flight == 1  # one read in flight per capsule, not a pile
    assert 2 <= len(source.balloon_calls) <= 4
    assert sampler.balloon("cl-b") is None


async def test_updates_iterates_ticks_and_ends_on_stop() -> None:
    sampler = Sampler(FakeSource([]), interval=0.02)
    updates = sampler.updates()
    await sampler.start()
    got: list[Tick] = []
    async for tick in updates:
        got.append(tick)
        if len(got) == 3:
            await sampler.stop()
    assert [t.stats.ticks for t in got] == [1, 2, 3]


async def test_a_lagging_updates_consumer_loses_the_oldest_ticks() -> None:
    sampler = Sampler(FakeSource([]), interval=0.02)
    updates = sampler.updates()
    await sampler.start()
    await until(lambda: sampler.stats.ticks >= 30)
    first = await anext(updates)
    await sampler.stop()
    rest = [tick async for tick in updates]
    kept = [t.stats.ticks for t in [first, *rest]]
    assert 16 <= len(kept) <= 18
    assert kept[0] >= 14  # the first ticks were dropped, not queued forever
    assert kept == list(range(kept[0], kept[0] + len(kept)))  # the newest ones are all kept


async def test_unsubscribe_and_a_failing_subscriber() -> None:
    sampler = Sampler(FakeSource([]), interval=0.02)
    calls: list[float] = []

    def broken(tick: Tick) -> None:
        raise RuntimeError("subscriber bug")

    sampler.subscribe(broken)
    unsubscribe = sampler.subscribe(lambda tick: calls.append(tick.ts))
    ticks = await collect(sampler, 3)
    assert len(calls) >= 3
    unsubscribe()
    unsubscribe()  # twice is harmless
    count = len(calls)
    await collect(sampler, 2)
    assert len(calls) == count
    assert len(ticks) == 3


# -- persistence -------------------------------------------------------------------------------


async def test_history_is_flushed_when_a_capsule_stops_being_a_target(store: Store) -> None:
    put_capsule(store, "cl-p", pid=os.getpid())
    source = FakeSource([refused_target("cl-p", pid=os.getpid())])
    sampler = Sampler(source, store=store, interval=0.05, flush_interval=3600)

    def on_tick(tick: Tick) -> None:
        if tick.stats.ticks == 4:
            source.current = []  # paused

    sampler.subscribe(on_tick)
    await sampler.start()
    await until(lambda: store.get_metrics("cl-p") is not None)  # at the pause, before stop()
    points = sampler.history("cl-p", "host_rss", 60)
    await sampler.stop()
    assert len(points) == 4

    # An agent restart: the new sampler reads it back, without ever polling the capsule.
    again = Sampler(FakeSource([]), store=store)
    reloaded = again.history("cl-p", "host_rss", 60)
    assert [v for _, v in reloaded] == [v for _, v in points]
    assert [ts for ts, _ in reloaded] == pytest.approx([ts for ts, _ in points], abs=1e-3)


async def test_a_reappearing_capsule_continues_its_stored_history(store: Store) -> None:
    put_capsule(store, "cl-r", pid=os.getpid())
    target = refused_target("cl-r", pid=os.getpid())
    first = Sampler(FakeSource([target]), store=store, interval=0.05)
    await collect(first, 3)  # stop() flushes
    second = Sampler(FakeSource([target]), store=store, interval=0.05)
    await collect(second, 3)
    stamps = [ts for ts, _ in second.history("cl-r", "host_rss", 60)]
    assert len(stamps) == 6
    assert stamps == sorted(stamps)


async def test_periodic_flush_while_running(store: Store) -> None:
    put_capsule(store, "cl-f", pid=os.getpid())
    sampler = Sampler(
        FakeSource([refused_target("cl-f", pid=os.getpid())]),
        store=store,
        interval=0.05,
        flush_interval=0.15,
    )
    await sampler.start()
    await until(lambda: store.get_metrics("cl-f") is not None)
    assert sampler.stats.ticks <= 6
    await sampler.stop()


async def test_a_destroyed_capsule_leaves_no_history_behind(store: Store) -> None:
    put_capsule(store, "cl-d", pid=os.getpid())
    source = FakeSource([refused_target("cl-d", pid=os.getpid())])
    sampler = Sampler(source, store=store, interval=0.05, flush_interval=3600)

    def on_tick(tick: Tick) -> None:
        if tick.stats.ticks == 3:
            store.delete("cl-d")  # what destroy does, then the capsule is gone from targets
            source.current = []

    sampler.subscribe(on_tick)
    await sampler.start()
    await until(lambda: sampler.stats.ticks >= 5)
    assert sampler.latest("cl-d") is None  # memory let go of it without a forget()
    sampler.flush("cl-d")
    await sampler.stop()
    assert store.get_metrics("cl-d") is None
    assert sampler.history("cl-d", "host_rss", 60) == []


async def test_flush_writes_nothing_for_a_capsule_the_store_no_longer_has(store: Store) -> None:
    put_capsule(store, "cl-z", pid=os.getpid())
    sampler = Sampler(FakeSource([refused_target("cl-z", pid=os.getpid())]), store=store)
    await collect(sampler, 1)
    store.delete("cl-z")  # destroy, racing a flush
    sampler.flush("cl-z")
    assert store.get_metrics("cl-z") is None
    assert len(sampler.history("cl-z", "host_rss", 60)) == 1  # memory is forget()'s business


async def test_forget_drops_memory_but_not_the_store(store: Store) -> None:
    put_capsule(store, "cl-g", pid=os.getpid())
    sampler = Sampler(
        FakeSource([refused_target("cl-g", pid=os.getpid())]), store=store, interval=0.05
    )
    await collect(sampler, 2)
    sampler.forget("cl-g")
    assert sampler.latest("cl-g") is None
    assert len(sampler.history("cl-g", "host_rss", 60)) == 2  # read back from the store


async def test_unreadable_stored_history_starts_afresh(store: Store) -> None:
    put_capsule(store, "cl-u")
    store.put_metrics("cl-u", "{broken")
    sampler = Sampler(FakeSource([]), store=store)
    assert sampler.history("cl-u", "host_rss", 60) == []


async def test_unknown_series_is_an_error() -> None:
    sampler = Sampler(FakeSource([]))
    with pytest.raises(ValueError, match="unknown series"):
        sampler.history("cl-x", "nope", 60)


# -- the manager adapter -----------------------------------------------------------------------


async def test_manager_source_lists_running_capsules_only(tmp_path: Path) -> None:
    from backend.capsules.manager import CapsuleManager

    base = tmp_path / "m"
    paths = Paths(
        data=base / "data", state=base / "state", cache=base / "cache", config=base / "config",
        shm=base / "shm",
    )  # fmt: skip
    manager = CapsuleManager(paths)
    try:
        put_capsule(manager.store, "cl-run", State.RUNNING, port=41001, pid=12345, token="tok")
        put_capsule(manager.store, "cl-old", State.RUNNING, port=41002, pid=None)
        put_capsule(manager.store, "cl-pau", State.PAUSED, port=41003)
        put_capsule(manager.store, "cl-err", State.ERROR, port=41004)
        source = ManagerSource(manager)
        assert source.targets() == [
            Target("cl-run", "http://127.0.0.1:41001", "tok", 12345),
            Target("cl-old", "http://127.0.0.1:41002", None, None),
        ]
        assert await source.balloon_stats("cl-run") is None  # pid 12345 is no VM of ours
        assert await source.balloon_stats("cl-missing") is None
    finally:
        await manager.close()


def test_parameters_are_checked() -> None:
    with pytest.raises(ValueError):
        Sampler(FakeSource([]), unhealthy_after=0)
    with pytest.raises(ValueError):
        Sampler(FakeSource([]), request_timeout=0)
