"""uvicorn's Server with its housekeeping loop woken once a second instead of ten times.

uvicorn checks for a shutdown request every 0.1 s and refreshes the Date header on every tenth
check. In a capsule every wake-up is emulated guest CPU (under TCG) that shows as host CPU of
an otherwise idle capsule. Here the loop sleeps a second at a time and a shutdown signal wakes
it at once, so exit is as quick as before.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import FrameType

import uvicorn

TICKS_PER_WAKE = 10
"""uvicorn's on_tick() counts tenths of a second; each wake-up here is a whole second of them."""


class QuietServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit_requested: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def main_loop(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._exit_requested = asyncio.Event()
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + TICKS_PER_WAKE) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._exit_requested.wait(), timeout=1.0)
            should_exit = await self.on_tick(counter)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        loop, event = self._loop, self._exit_requested
        if loop is not None and event is not None and not loop.is_closed():
            # A signal handler interrupts the loop's own wait; call_soon_threadsafe also
            # writes to its wake-up pipe, so the wait ends now rather than at its timeout.
            loop.call_soon_threadsafe(event.set)
