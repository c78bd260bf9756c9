"""The one sampler behind every sparkline: all running capsules, once per second.

Per tick: the source lists the running capsules; the VMM processes are read with psutil; every
envd is asked for /metrics at once, each bounded by a short timeout so a dead capsule costs
the others nothing; the samples go into each capsule's rings and out to subscribers. Balloon
statistics are fetched in the background, staggered so only a fifth of the capsules are asked
per tick. History goes to the state DB when a capsule stops being a target (paused, stopped),
every `flush_interval` (staggered too), and on stop(); it comes back when a capsule first
appears, so graphs survive a pause and an agent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import Any

from backend.capsules.store import Store
from backend.runtime.base import BalloonStats
from backend.sampler import history_codec
from backend.sampler.clock import FixedRateClock
from backend.sampler.envd_poll import PollerThread, figures
from backend.sampler.host_probe import HostProbe
from backend.sampler.models import SERIES, Sample, SamplerStats, Target, Tick
from backend.sampler.rings import TieredHistory
from backend.sampler.sources import TargetSource
from backend.sampler.stats import TickStats

log = logging.getLogger("wrenn.sampler")

UPDATES_QUEUE = 16
"""Ticks an updates() iterator may fall behind before the oldest are dropped."""

TickCallback = Callable[[Tick], None]


class _CapsuleState:
    __slots__ = ("active", "balloon", "dirty", "failures", "history", "latest", "slot")

    def __init__(self, slot: int) -> None:
        self.history = TieredHistory(len(SERIES))
        self.latest: Sample | None = None
        self.balloon: BalloonStats | None = None
        self.failures = 0
        """Consecutive ticks envd gave no figures."""
        self.slot = slot
        """Offset that spreads this capsule's flushes and balloon reads over the ticks."""
        self.dirty = False
        """Sampled since the last flush."""
        self.active = False


class Sampler:
    def __init__(
        self,
        source: TargetSource,
        *,
        store: Store | None = None,
        interval: float = 1.0,
        request_timeout: float = 0.5,
        balloon_interval: float = 5.0,
        unhealthy_after: int = 3,
        flush_interval: float = 60.0,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be positive, not {interval}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be positive, not {request_timeout}")
        if unhealthy_after < 1:
            raise ValueError(f"unhealthy_after must be at least 1, not {unhealthy_after}")
        self.interval = interval
        self._source = source
        self._store = store
        self._unhealthy_after = unhealthy_after
        self._balloon_every = max(1, round(balloon_interval / interval))
        self._balloon_timeout = max(request_timeout, balloon_interval)
        self._flush_every = max(1, round(flush_interval / interval))
        self._clock = FixedRateClock(interval, self._tick)
        self._poller = PollerThread(request_timeout)
        self._host = HostProbe()
        self._stats = TickStats(interval)
        self._states: dict[str, _CapsuleState] = {}
        self._targets: dict[str, Target] = {}
        self._callbacks: list[TickCallback] = []
        self._queues: set[asyncio.Queue[Tick | None]] = set()
        self._balloon_tasks: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._next_slot = 0
        self._wall_start = 0.0

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        if self._clock.is_running:
            return
        self._poller.start()
        self._clock.start()
        self._wall_start = time.time()

    async def stop(self) -> None:
        """Stop ticking (the tick in progress completes), flush every history that changed,
        close the connections and end every updates() iterator."""
        await self._clock.stop()
        for task in list(self._balloon_tasks.values()):
            task.cancel()
        await asyncio.gather(*self._balloon_tasks.values(), return_exceptions=True)
        self._balloon_tasks.clear()
        for capsule_id, state in self._states.items():
            state.active = False
            if state.dirty:
                self.flush(capsule_id)
        self._targets.clear()
        await self._poller.aclose()
        await asyncio.gather(*self._background, return_exceptions=True)
        for queue in list(self._queues):
            self._offer(queue, None)

    # -- subscriptions ------------------------------------------------------------------------

    def subscribe(self, callback: TickCallback) -> Callable[[], None]:
        """Call `callback` with every Tick (on the event loop, right after the tick)."""
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return unsubscribe

    def updates(self) -> AsyncGenerator[Tick, None]:
        """Every Tick from now on, until stop(). A consumer more than UPDATES_QUEUE ticks
        behind loses the oldest; break out of the loop (or aclose()) to unsubscribe."""
        queue: asyncio.Queue[Tick | None] = asyncio.Queue(UPDATES_QUEUE)
        # Registered now rather than on first iteration, so no tick falls in between.
        self._queues.add(queue)
        return self._drain(queue)

    async def _drain(self, queue: asyncio.Queue[Tick | None]) -> AsyncGenerator[Tick, None]:
        try:
            while True:
                tick = await queue.get()
                if tick is None:
                    return
                yield tick
        finally:
            self._queues.discard(queue)

    @staticmethod
    def _offer(queue: asyncio.Queue[Tick | None], item: Tick | None) -> None:
        if queue.full():
            queue.get_nowait()
        queue.put_nowait(item)

    def _publish(self, tick: Tick) -> None:
        for callback in list(self._callbacks):
            try:
                callback(tick)
            except Exception:
                log.exception("sampler subscriber %r failed", callback)
        for queue in list(self._queues):
            self._offer(queue, tick)

    # -- queries ------------------------------------------------------------------------------

    def latest(self, capsule_id: str) -> Sample | None:
        """The last sample this process took of the capsule (kept after it stops running)."""
        state = self._states.get(capsule_id)
        return state.latest if state is not None else None

    def history(
        self, capsule_id: str, series: str, window_s: float, now: float | None = None
    ) -> list[tuple[float, float]]:
        """(ts, value) of one series over the last `window_s` seconds before `now` (default:
        the current time), oldest first, from the finest tier that covers the window.
        A capsule not sampled by this process (paused since before it started) is read from
        the store."""
        try:
            column = SERIES.index(series)
        except ValueError:
            raise ValueError(f"unknown series {series!r}; one of {', '.join(SERIES)}") from None
        state = self._states.get(capsule_id) or self._load_if_known(capsule_id)
        if state is None:
            return []
        return state.history.points(column, window_s, time.time() if now is None else now)

    def balloon(self, capsule_id: str) -> BalloonStats | None:
        state = self._states.get(capsule_id)
        return state.balloon if state is not None else None

    @property
    def stats(self) -> SamplerStats:
        return self._stats.snapshot(self._clock.missed, len(self._targets))

    def reset_stats(self) -> None:
        """Measure tick durations, missed ticks and the request rate afresh from now on."""
        self._stats.reset(self._clock.missed)

    # -- persistence --------------------------------------------------------------------------

    def flush(self, capsule_id: str) -> None:
        """Write this capsule's history to the store now. Nothing is written for a capsule
        the store no longer has: destroy deleted its history with it."""
        state = self._states.get(capsule_id)
        if self._store is None or state is None or not self._known(capsule_id):
            return
        try:
            self._store.put_metrics(capsule_id, history_codec.encode(state.history, SERIES))
        except sqlite3.Error as exc:
            log.warning("could not save the metric history of %s: %s", capsule_id, exc)
            return
        state.dirty = False

    def _known(self, capsule_id: str) -> bool:
        """Whether the store has this capsule (False on a read error: write nothing then)."""
        assert self._store is not None
        try:
            return self._store.get(capsule_id) is not None
        except sqlite3.Error as exc:
            log.warning("could not read capsule %s from the store: %s", capsule_id, exc)
            return False

    def forget(self, capsule_id: str) -> None:
        """Drop the in-memory history (after destroy); the store is not touched."""
        self._states.pop(capsule_id, None)
        self._targets.pop(capsule_id, None)
        self._host.drop(capsule_id)
        task = self._balloon_tasks.pop(capsule_id, None)
        if task is not None:
            task.cancel()
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # no loop any more: its connections went with it
            return
        self._spawn(self._poller.drop(capsule_id))

    def _new_state(self, capsule_id: str) -> _CapsuleState:
        state = _CapsuleState(self._next_slot)
        self._next_slot += 1
        text = None
        if self._store is not None:
            try:
                text = self._store.get_metrics(capsule_id)
            except sqlite3.Error as exc:
                log.warning("could not read the metric history of %s: %s", capsule_id, exc)
        if text:
            try:
                history_codec.decode(text, state.history, SERIES)
            except history_codec.HistoryFormatError as exc:
                log.warning("stored metric history of %s ignored: %s", capsule_id, exc)
        self._states[capsule_id] = state
        return state

    def _load_if_known(self, capsule_id: str) -> _CapsuleState | None:
        if self._store is None or not self._known(capsule_id):
            return None
        return self._new_state(capsule_id)

    # -- the tick -----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_targets(self) -> list[Target]:
        try:
            listed = self._source.targets()
        except Exception:
            log.exception("the target source failed; polling the previous targets")
            listed = list(self._targets.values())
        current = {t.capsule_id: t for t in listed}
        for capsule_id in self._targets.keys() - current.keys():
            await self._retire(capsule_id)
        for capsule_id in current.keys() - self._targets.keys():
            state = self._states.get(capsule_id) or self._new_state(capsule_id)
            state.active = True
            state.failures = 0
        self._targets = current
        return list(current.values())

    async def _retire(self, capsule_id: str) -> None:
        """A capsule stopped being a target: paused, stopped, failed or destroyed."""
        state = self._states.get(capsule_id)
        if state is not None:
            state.active = False
            if self._store is not None and not self._known(capsule_id):
                # Destroyed: the store dropped its history with it, so does memory.
                del self._states[capsule_id]
            elif state.dirty:
                self.flush(capsule_id)
        self._host.drop(capsule_id)
        task = self._balloon_tasks.pop(capsule_id, None)
        if task is not None:
            task.cancel()
        await self._poller.drop(capsule_id)

    async def _tick(self, k: int) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        ts = self._wall_start + k * self.interval
        requests_before = self._poller.requests
        targets = await self._refresh_targets()
        fetches = self._poller.fetch_many(targets)
        # The VMM processes are read while the envds answer.
        host = [self._host.read(t.capsule_id, t.pid) for t in targets]
        results = await fetches
        samples: dict[str, Sample] = {}
        for target, result, (host_cpu, host_rss, host_own) in zip(
            targets, results, host, strict=True
        ):
            state = self._states.get(target.capsule_id)
            if state is None:  # forgotten while its request was in flight
                continue
            if isinstance(result, dict):
                state.failures = 0
                used, total, cache, cpu = figures(result)
                sample = Sample(
                    target.capsule_id,
                    ts,
                    True,
                    None,
                    used,
                    total,
                    cache,
                    cpu,
                    host_cpu,
                    host_rss,
                    host_own,
                )
            else:
                state.failures += 1
                healthy = state.failures < self._unhealthy_after
                sample = Sample(
                    target.capsule_id,
                    ts,
                    healthy,
                    result,
                    None,
                    None,
                    None,
                    None,
                    host_cpu,
                    host_rss,
                    host_own,
                )
            state.history.add(ts, sample.values())
            state.latest = sample
            state.dirty = True
            samples[target.capsule_id] = sample
            if (k + state.slot) % self._balloon_every == 0:
                self._start_balloon(target.capsule_id)
            if (k + state.slot) % self._flush_every == 0 and k > 0:
                self.flush(target.capsule_id)
        self._stats.record(started, loop.time() - started, self._poller.requests - requests_before)
        self._publish(Tick(ts, samples, self.stats))

    def _start_balloon(self, capsule_id: str) -> None:
        if capsule_id in self._balloon_tasks:
            return
        task = asyncio.get_running_loop().create_task(self._read_balloon(capsule_id))
        self._balloon_tasks[capsule_id] = task

    async def _read_balloon(self, capsule_id: str) -> None:
        try:
            async with asyncio.timeout(self._balloon_timeout):
                stats = await self._source.balloon_stats(capsule_id)
        except TimeoutError:
            stats = None
        except Exception as exc:
            log.debug("balloon stats of %s failed: %s", capsule_id, exc)
            stats = None
        finally:
            self._balloon_tasks.pop(capsule_id, None)
        state = self._states.get(capsule_id)
        if state is not None and state.active:
            state.balloon = stats
