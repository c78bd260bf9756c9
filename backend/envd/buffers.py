"""Bounded output log shared by several readers, with flow control towards the producer.

The producer appends chunks; each reader (a WebSocket, an NDJSON stream, an exec collector)
walks the log at its own pace. Memory stays bounded two ways: the log keeps at most
``capacity`` bytes (oldest chunks go first, which only hurts readers that attach late), and
while any attached reader lags more than ``high_water`` bytes the log reports itself
not writable, so producers stop reading their pipe or PTY and the kernel blocks the writer
(a ``yes`` in a terminal cannot outrun a slow client). With no reader attached nothing
throttles and the log simply keeps the most recent output for a later replay.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

T = TypeVar("T")

# Accounting overhead per chunk, so a flood of 1-byte chunks is bounded too.
CHUNK_OVERHEAD = 64


@dataclass
class Batch(Generic[T]):
    items: list[T]
    # Bytes the reader never saw because they left the log before it got to them.
    missed: int
    # True when the batch does not continue the stream where this reader saw it last (a replay
    # of a trimmed log, or a gap), so it may start in the middle of a character or sequence.
    resync: bool


class LogReader(Generic[T]):
    def __init__(self, log: OutputLog[T], index: int, offset: int) -> None:
        self._log = log
        self.index = index
        self.offset = offset
        self.closed = False
        self.fresh = True

    @property
    def lag(self) -> int:
        return self._log.end_offset - self.offset

    def read_nowait(self, max_bytes: int) -> Batch[T] | None:
        """What is available now, or None when nothing is (check ``at_end`` to tell apart)."""
        return self._log.read(self, max_bytes)

    @property
    def at_end(self) -> bool:
        return self._log.closed and self.index >= self._log.end_index

    async def next(self, max_bytes: int) -> Batch[T] | None:
        """Wait for output; None once the log is closed and fully read."""
        while True:
            batch = self._log.read(self, max_bytes)
            if batch is not None:
                return batch
            if self.at_end or self.closed:
                return None
            await self._log.wait()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._log.detach(self)


class OutputLog(Generic[T]):
    def __init__(self, capacity: int, high_water: int | None = None, low_water: int = 0) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.high_water = capacity // 2 if high_water is None else high_water
        self.low_water = min(low_water, self.high_water)
        # A list plus a head index gives O(1) positional reads; trimmed slots are compacted lazily.
        self._items: list[T | None] = []
        self._sizes: list[int] = []
        self._head = 0
        self._first_index = 0
        self._first_offset = 0
        self.end_index = 0
        self.end_offset = 0
        self._retained = 0
        self.closed = False
        self._readers: set[LogReader[T]] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self.writable = asyncio.Event()
        self.writable.set()
        self._resume_callbacks: list[Callable[[], None]] = []

    @property
    def retained_bytes(self) -> int:
        return self._retained

    @property
    def throttled(self) -> bool:
        return not self.writable.is_set()

    @property
    def reader_count(self) -> int:
        return len(self._readers)

    def attach(self, replay: bool = True) -> LogReader[T]:
        if replay:
            reader = LogReader(self, self._first_index, self._first_offset)
        else:
            reader = LogReader(self, self.end_index, self.end_offset)
            # Starting at live output was asked for; it is not a gap to report.
            reader.fresh = False
        self._readers.add(reader)
        self._update_throttle()
        return reader

    def detach(self, reader: LogReader[T]) -> None:
        self._readers.discard(reader)
        self._update_throttle()
        self._wake()

    def append(self, item: T, size: int) -> None:
        if self.closed:
            return
        size += CHUNK_OVERHEAD
        self._items.append(item)
        self._sizes.append(size)
        self.end_index += 1
        self.end_offset += size
        self._retained += size
        self._trim()
        self._update_throttle()
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def shrink(self, capacity: int) -> None:
        """Keep less from now on (a finished producer's output is only kept for replay)."""
        self.capacity = min(self.capacity, capacity)
        self._trim(keep_from=min((r.index for r in self._readers), default=self.end_index))

    def on_writable(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, as soon as the log is writable again (now if it already is)."""
        if self.writable.is_set():
            callback()
        else:
            self._resume_callbacks.append(callback)

    def read(self, reader: LogReader[T], max_bytes: int) -> Batch[T] | None:
        missed = 0
        if reader.index < self._first_index:
            missed = self._first_offset - reader.offset
            reader.index = self._first_index
            reader.offset = self._first_offset
        resync = missed > 0 or (reader.fresh and reader.offset > 0)
        pos = self._head + (reader.index - self._first_index)
        end = len(self._items)
        if pos >= end:
            return None if missed == 0 else Batch([], missed, resync)
        items: list[T] = []
        taken = 0
        while pos < end:
            size = self._sizes[pos]
            if items and taken + size > max_bytes:
                break
            items.append(cast(T, self._items[pos]))
            taken += size
            pos += 1
        reader.index += len(items)
        reader.offset += taken
        reader.fresh = False
        if self.throttled:
            self._update_throttle()
        return Batch(items, missed, resync)

    async def wait(self) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            if not future.done():
                future.cancel()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)

    def _trim(self, keep_from: int | None = None) -> None:
        limit = self.end_index - 1 if keep_from is None else min(keep_from, self.end_index - 1)
        while self._retained > self.capacity and self._first_index < limit:
            size = self._sizes[self._head]
            self._items[self._head] = None
            self._head += 1
            self._first_index += 1
            self._first_offset += size
            self._retained -= size
        if self._head > 1024 and self._head * 2 > len(self._items):
            del self._items[: self._head]
            del self._sizes[: self._head]
            self._head = 0

    def _update_throttle(self) -> None:
        lag = max((r.lag for r in self._readers), default=0)
        if self.writable.is_set():
            if lag > self.high_water:
                self.writable.clear()
        elif lag <= self.low_water:
            self.writable.set()
            callbacks, self._resume_callbacks = self._resume_callbacks, []
            for callback in callbacks:
                callback()
