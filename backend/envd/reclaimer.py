"""Drop the guest's page cache when memory use crosses a threshold.

A guest never gives page cache back by itself: every page it once touched stays resident
on the host and lands in every snapshot. Dropping the clean cache once usage crosses the
threshold keeps the capsule's footprint close to what its programs really use.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .guest import GuestKernel
from .metrics import MemInfo, ProcReader
from .state import RuntimeState

log = logging.getLogger("envd.reclaimer")

# Below this much cache a drop frees too little to be worth walking the page cache.
MIN_CACHE_BYTES = 8 * 1024 * 1024


def should_reclaim(
    mem: MemInfo,
    threshold_pct: float,
    snapshot_in_progress: bool,
    min_cache: int = MIN_CACHE_BYTES,
) -> bool:
    if snapshot_in_progress or mem.total <= 0:
        return False
    if mem.cached < min_cache:
        return False
    return mem.used_fraction * 100.0 >= threshold_pct


class Reclaimer:
    def __init__(
        self,
        state: RuntimeState,
        kernel: GuestKernel,
        reader: ProcReader,
        interval: float = 2.0,
    ) -> None:
        self.state = state
        self.kernel = kernel
        self.reader = reader
        self.interval = interval
        # Held by anyone dropping caches, so a snapshot never races a periodic reclaim.
        self.lock = asyncio.Lock()
        self.reclaims = 0
        self.checks = 0
        self.last_reclaim_at: float | None = None

    async def check_once(self) -> bool:
        self.checks += 1
        mem = self.reader.meminfo()
        if not should_reclaim(mem, self.state.reclaim_threshold, self.state.snapshot_in_progress):
            return False
        async with self.lock:
            # The flag may have been raised while this task waited for the lock.
            if self.state.snapshot_in_progress:
                return False
            await asyncio.to_thread(self.kernel.drop_page_cache)
        self.reclaims += 1
        self.last_reclaim_at = time.time()
        log.info(
            "reclaimed page cache at %.1f%% used (cache %d MiB)",
            mem.used_fraction * 100,
            mem.cached >> 20,
        )
        return True

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except (OSError, ValueError) as exc:
                log.warning("reclaim check failed: %s", exc)
            await asyncio.sleep(self.interval)
