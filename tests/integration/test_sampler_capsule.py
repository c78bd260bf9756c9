"""The sampler against a real capsule: the guest's own memory view, every second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx
import pytest

from backend.capsules.manager import CapsuleManager
from backend.sampler import ManagerSource, Sample, Sampler, Tick

pytestmark = pytest.mark.vm
MiB = 1 << 20


async def wait_for_tick(
    ticks: asyncio.Queue[Tick],
    capsule_id: str,
    predicate: Callable[[Sample], bool],
    limit: int,
) -> tuple[int, Sample]:
    """The first of the next `limit` ticks whose sample satisfies `predicate`."""
    seen = []
    for n in range(1, limit + 1):
        tick = await asyncio.wait_for(ticks.get(), 10)
        sample = tick.samples.get(capsule_id)
        seen.append(sample)
        if sample is not None and predicate(sample):
            return n, sample
    raise AssertionError(f"no matching sample within {limit} ticks: {seen}")


async def test_allocation_shows_within_two_ticks_and_goes_away(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    sampler = Sampler(ManagerSource(manager), store=manager.store)
    ticks: asyncio.Queue[Tick] = asyncio.Queue()
    unsubscribe = sampler.subscribe(ticks.put_nowait)
    await sampler.start()
    try:
        # A restored capsule gets back the RAM its snapshot's balloon held while the guest
        # deflates it; until then that memory counts as used, and its fall would hide the
        # allocation below. The baseline is taken once the balloon is back.
        deadline = time.monotonic() + 30
        while True:
            balloon = await manager.balloon_stats(capsule.id)
            actual = balloon.actual if balloon is not None else None
            if actual is not None and actual >= capsule.memory_mib << 20:
                break
            assert time.monotonic() < deadline, f"the balloon did not deflate: {balloon}"
            await asyncio.sleep(0.2)
        while not ticks.empty():
            ticks.get_nowait()
        _, base = await wait_for_tick(
            ticks, capsule.id, lambda s: s.healthy and s.guest_mem_used is not None, 10
        )
        assert base.guest_mem_used is not None
        # host RSS is reported beside the guest's figure, never as it
        assert base.host_rss is not None and base.host_rss != base.guest_mem_used
        hog = httpx.AsyncClient(
            base_url=capsule.envd_url, headers={"X-Access-Token": capsule.access_token}
        )
        started = await hog.post(
            "/processes",
            json={
                "cmd": 'python3 -c \'b = b"x" * (100 * 2**20); import time; '
                'open("/tmp/ready", "w").close(); time.sleep(600)\''
            },
        )
        pid = started.json()["pid"]
        deadline = time.monotonic() + 30
        while (await manager.exec(capsule.id, "test -e /tmp/ready")).exit_code != 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        while not ticks.empty():
            ticks.get_nowait()
        n, _ = await wait_for_tick(
            ticks,
            capsule.id,
            lambda s: (s.guest_mem_used or 0) - (base.guest_mem_used or 0) > 90 * MiB,
            2,
        )
        assert n <= 2
        await hog.post(f"/processes/{pid}/signal", json={"signal": "SIGKILL"})
        await hog.aclose()
        await wait_for_tick(
            ticks,
            capsule.id,
            lambda s: (s.guest_mem_used or 0) - (base.guest_mem_used or 0) < 30 * MiB,
            5,
        )
        series = sampler.history(capsule.id, "guest_mem_used", 60)
        assert max(v for _, v in series) - min(v for _, v in series) > 90 * MiB
        assert sampler.stats.missed_ticks == 0
    finally:
        unsubscribe()
        await sampler.stop()
