"""A fixed-rate clock: tick k is due at start + k * interval, whatever the ticks cost.

Sleeping a fixed interval after each tick's work would drift by the work's duration and
bunch up after a stall; arming every timer from the start time keeps each tick on its grid
slot. A slot whose deadline arrives while the previous tick still runs is skipped and
counted, never run late or concurrently, so a slow round cannot snowball into a backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable

log = logging.getLogger("wrenn.sampler")

TickFn = Callable[[int], Awaitable[None]]


class FixedRateClock:
    def __init__(self, interval: float, on_tick: TickFn) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval}")
        self.interval = interval
        self._on_tick = on_tick
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None
        self.started = 0
        """Ticks whose work was started."""
        self.missed = 0
        """Grid slots that passed without a tick."""

    @property
    def start_time(self) -> float:
        """The loop time of slot 0."""
        return self._start

    def deadline(self, k: int) -> float:
        return self._start + k * self.interval

    @property
    def is_running(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        """Start with slot 0 due now; needs a running event loop."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._start = self._loop.time()
        self._arm(0)

    async def stop(self) -> None:
        """No new ticks; waits for the tick in progress to finish."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None
        running, self._running = self._running, None
        if running is not None and not running.done():
            with contextlib.suppress(Exception):
                await running

    def _arm(self, k: int) -> None:
        assert self._loop is not None
        self._timer = self._loop.call_at(self.deadline(k), self._fire, k)

    def _fire(self, k: int) -> None:
        loop = self._loop
        if loop is None:
            return
        # asyncio may run a timer up to one clock resolution early, so lateness is floored at 0.
        late_slots = max(0, math.floor((loop.time() - self._start) / self.interval) - k)
        if late_slots:
            # The loop itself was blocked past later deadlines: those slots are gone.
            self.missed += late_slots
            k += late_slots
        if self._running is not None and not self._running.done():
            self.missed += 1
        else:
            self.started += 1
            self._running = loop.create_task(self._run(k), name=f"sampler-tick-{k}")
        self._arm(k + 1)

    async def _run(self, k: int) -> None:
        try:
            await self._on_tick(k)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("sampler tick %d failed", k)
