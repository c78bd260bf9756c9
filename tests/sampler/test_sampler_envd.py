"""The sampler against real envd processes on the host (envd --root: /proc is the host's)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psutil

from backend.capsules.store import Store
from backend.sampler import Sampler, Tick
from tests.sampler.conftest import HostEnvd
from tests.sampler.helpers import FakeSource, meminfo_used, put_capsule

INTERVAL = 0.5


async def test_every_envd_is_sampled_every_tick_with_the_guests_memory_math(
    start_envds: Callable[[int], list[HostEnvd]],
) -> None:
    envds = start_envds(3)
    ids = [f"cl-{i}" for i in range(3)]
    source = FakeSource([e.target(i) for e, i in zip(envds, ids, strict=True)])
    sampler = Sampler(source, interval=INTERVAL)
    ticks: list[Tick] = []
    host_memory: list[tuple[int, int]] = []

    def on_tick(tick: Tick) -> None:
        ticks.append(tick)
        host_memory.append(meminfo_used())

    sampler.subscribe(on_tick)
    await sampler.start()
    while len(ticks) < 5:
        await asyncio.sleep(0.05)
    await sampler.stop()

    assert [round((t.ts - ticks[0].ts) / INTERVAL) for t in ticks] == list(range(len(ticks)))
    for n, (tick, (mem_total, mem_used)) in enumerate(zip(ticks, host_memory, strict=True)):
        assert set(tick.samples) == set(ids)
        for envd, capsule_id in zip(envds, ids, strict=True):
            sample = tick.samples[capsule_id]
            assert sample.healthy and sample.error is None
            assert sample.ts == tick.ts
            assert sample.guest_mem_total == mem_total
            assert sample.guest_mem_used is not None
            # MemTotal - MemAvailable, read by envd a few ms before we read it here.
            assert abs(sample.guest_mem_used - mem_used) < max(64 << 20, mem_total // 50)
            assert sample.guest_mem_cache is not None and sample.guest_mem_cache > 0
            assert sample.guest_cpu_pct is not None and 0 <= sample.guest_cpu_pct <= 100
            rss = psutil.Process(envd.proc.pid).memory_info().rss
            assert sample.host_rss is not None and abs(sample.host_rss - rss) < 8 << 20
            assert (sample.host_cpu_pct is None) == (n == 0)
    stats = sampler.stats
    assert stats.missed_ticks == 0
    assert stats.targets == 0  # stopped
    assert stats.ticks == len(ticks)
    assert stats.tick_p99_ms < 200
    assert 3 / INTERVAL * 0.6 <= stats.requests_per_s <= 3 / INTERVAL * 1.1
    last = ticks[-1].stats
    assert last.targets == 3 and last.ticks == len(ticks)


async def test_history_survives_flush_and_a_new_sampler(
    start_envds: Callable[[int], list[HostEnvd]], store: Store
) -> None:
    (envd,) = start_envds(1)
    put_capsule(store, "cl-keep", port=envd.port, pid=envd.proc.pid)
    first = Sampler(FakeSource([envd.target("cl-keep")]), store=store, interval=0.2)
    ticks: list[Tick] = []
    first.subscribe(ticks.append)
    await first.start()
    while len(ticks) < 3:
        await asyncio.sleep(0.02)
    await first.stop()
    before = first.history("cl-keep", "guest_mem_used", 600)
    assert len(before) == len(ticks) >= 3

    second = Sampler(FakeSource([]), store=store, interval=0.2)
    after = second.history("cl-keep", "guest_mem_used", 600)
    assert [v for _, v in after] == [v for _, v in before]
    assert all(abs(a[0] - b[0]) < 1e-3 for a, b in zip(after, before, strict=True))
    # The coarse tiers come back too (as the open bucket's average so far).
    hour = second.history("cl-keep", "guest_mem_used", 3600)
    assert len(hour) in (1, 2)
