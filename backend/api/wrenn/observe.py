"""What a Wrenn client watches: per-capsule metrics (the sampler's history), team stats and
daily usage (the reservations this agent recorded), and the server-sent event stream (the
event log the dashboard shows)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from backend.api.capsules import Capsules
from backend.capsules.errors import CapsuleNotFound
from backend.capsules.models import Event, State

from .base import Base
from .bodies import capsule_body, iso
from .errors import invalid

METRIC_RANGES = {"5m": 300, "10m": 600, "1h": 3600, "2h": 7200, "6h": 21600, "12h": 43200}
METRIC_RANGES["24h"] = 86400
STATS_RANGES = {"5m": 300, "1h": 3600, "6h": 21600, "24h": 86400, "30d": 30 * 86400}
RECORD_INTERVAL_S = 5.0
SERIES_POINTS = 60
EVENT_POLL_S = 0.25
KEEPALIVE_S = 15.0
EVENT_BATCH = 500


@dataclass
class Reservations:
    """Running capsules, vCPUs and memory reserved, recorded every few seconds while the agent
    runs: the last 24 h in full, per-day totals (for usage) and peaks beyond."""

    recent: deque[tuple[float, int, int, int]] = field(
        default_factory=lambda: deque(maxlen=int(86400 / RECORD_INTERVAL_S))
    )
    daily_minutes: dict[date, list[float]] = field(default_factory=dict)
    """day -> [vCPU-minutes, MiB-minutes]"""
    daily_peaks: dict[date, list[int]] = field(default_factory=dict)
    """day -> [running, vCPUs, MiB]"""

    def record(self, ts: float, running: int, vcpus: int, memory_mb: int) -> None:
        day = datetime.fromtimestamp(ts, UTC).date()
        if self.recent:
            dt = min(ts - self.recent[-1][0], 2 * RECORD_INTERVAL_S)
            _, _, last_vcpus, last_memory = self.recent[-1]
            minutes = self.daily_minutes.setdefault(day, [0.0, 0.0])
            minutes[0] += last_vcpus * dt / 60
            minutes[1] += last_memory * dt / 60
        peaks = self.daily_peaks.setdefault(day, [0, 0, 0])
        for i, value in enumerate((running, vcpus, memory_mb)):
            peaks[i] = max(peaks[i], value)
        self.recent.append((ts, running, vcpus, memory_mb))


class Observe(Base):
    def __init__(self, capsules: Capsules, envd: httpx.AsyncClient) -> None:
        super().__init__(capsules, envd)
        self.reservations = Reservations()

    def current(self) -> tuple[int, int, int]:
        running = [c for c in self.capsules.list() if c.state == State.RUNNING]
        return len(running), sum(c.vcpus for c in running), sum(c.memory_mib for c in running)

    async def record(self) -> None:
        self.reservations.record(time.time(), *self.current())

    # -- metrics -------------------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        capsule = self.find(request.path_params["id"])
        name = request.query_params.get("range", "10m")
        if name not in METRIC_RANGES:
            raise invalid(f"range must be one of {', '.join(METRIC_RANGES)}")
        window = METRIC_RANGES[name]
        cpu = self.capsules.history(capsule.id, "guest_cpu_pct", window)
        rss = dict(self.capsules.history(capsule.id, "host_rss", window))
        disk = self.capsules.disk_allocated(capsule.id)
        points: list[dict[str, Any]] = [
            {"timestamp_unix": int(ts), "cpu_pct": round(value, 2), "mem_bytes": _int(rss.get(ts))}
            for ts, value in cpu
        ]
        if points and disk is not None:
            points[-1]["disk_bytes"] = disk
        return JSONResponse({"sandbox_id": capsule.id, "range": name, "points": points})

    # -- stats and usage -----------------------------------------------------------------------

    async def stats(self, request: Request) -> Response:
        name = request.query_params.get("range", "1h")
        if name not in STATS_RANGES:
            raise invalid(f"range must be one of {', '.join(STATS_RANGES)}")
        await self.record()
        running, vcpus, memory = self.current()
        since = datetime.now(UTC).date() - timedelta(days=30)
        peaks = [0, 0, 0]
        for day, values in self.reservations.daily_peaks.items():
            if day >= since:
                peaks = [max(a, b) for a, b in zip(peaks, values, strict=True)]
        cutoff = time.time() - STATS_RANGES[name]
        rows = [r for r in self.reservations.recent if r[0] >= cutoff]
        step = max(1, len(rows) // SERIES_POINTS)
        rows = rows[::step]
        return JSONResponse(
            {
                "range": name,
                "current": {
                    "running_count": running,
                    "vcpus_reserved": vcpus,
                    "memory_mb_reserved": memory,
                },
                "peaks": {"running_count": peaks[0], "vcpus": peaks[1], "memory_mb": peaks[2]},
                "series": {
                    "labels": [iso(r[0]) for r in rows],
                    "running": [r[1] for r in rows],
                    "vcpus": [r[2] for r in rows],
                    "memory_mb": [r[3] for r in rows],
                },
            }
        )

    async def usage(self, request: Request) -> Response:
        today = datetime.now(UTC).date()
        start = _date(request.query_params.get("from"), today - timedelta(days=30), "from")
        end = _date(request.query_params.get("to"), today, "to")
        if start > end:
            raise invalid("from must not be after to")
        if (end - start).days > 366:
            raise invalid("the range from..to is limited to 366 days")
        await self.record()
        points = []
        day = start
        while day <= end:
            cpu, ram = self.reservations.daily_minutes.get(day, [0.0, 0.0])
            points.append(
                {
                    "date": day.isoformat(),
                    "cpu_minutes": round(cpu, 3),
                    "ram_mb_minutes": round(ram, 3),
                }
            )
            day += timedelta(days=1)
        return JSONResponse({"from": start.isoformat(), "to": end.isoformat(), "points": points})

    # -- events --------------------------------------------------------------------------------

    def sse_event(self, event: Event) -> dict[str, Any] | None:
        kind, message = event.kind, event.message
        outcome: str | None = "success"
        if kind == "running":
            name = "capsule.resume" if message.startswith("resumed") else "capsule.create"
        elif kind == "paused":
            name = "capsule.pause"
        elif kind == "destroy":
            name = "capsule.destroy"
        elif kind == "template":
            name = "template.snapshot.create"
        elif kind == "template-removed":
            name = "template.snapshot.delete"
        else:
            name, outcome = "capsule.state.changed", None
        is_template = name.startswith("template.") and kind == "template-removed"
        resource_id = (
            event.capsule_id.removeprefix("template:") if is_template else event.capsule_id
        )
        body: dict[str, Any] = {
            "event": name,
            "resource": {"id": resource_id, "type": "template" if is_template else "capsule"},
            "actor": {"type": "system", "id": "wrenn-tui", "name": "wrenn-tui"},
            "metadata": {"kind": kind, "message": message},
            "timestamp": iso(event.ts),
        }
        if outcome is not None:
            body["outcome"] = outcome
        if kind == "error":
            body["metadata"]["to"] = "error"
        if name.startswith("capsule."):
            try:
                body["sandbox"] = capsule_body(self.capsules.get(event.capsule_id))
            except CapsuleNotFound:
                body["sandbox"] = None
        return body

    async def events(self, request: Request) -> Response:
        async def stream() -> AsyncIterator[str]:
            seen = {_key(e) for e in self.capsules.events(EVENT_BATCH)}
            yield _frame({"event": "connected", "timestamp": iso(time.time())})
            quiet = 0.0
            while True:
                await asyncio.sleep(EVENT_POLL_S)
                batch = self.capsules.events(EVENT_BATCH)
                fresh = [e for e in batch if _key(e) not in seen]
                seen = {_key(e) for e in batch}
                for event in fresh:
                    body = self.sse_event(event)
                    if body is not None:
                        yield _frame(body)
                quiet = 0.0 if fresh else quiet + EVENT_POLL_S
                if quiet >= KEEPALIVE_S:
                    quiet = 0.0
                    yield ":keepalive\n\n"

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    def routes(self) -> list[Route]:
        return [
            Route("/v1/capsules/stats", self.stats, methods=["GET"]),
            Route("/v1/capsules/usage", self.usage, methods=["GET"]),
            Route("/v1/capsules/{id}/metrics", self.metrics, methods=["GET"]),
            Route("/v1/events/stream", self.events, methods=["GET"]),
        ]


def _key(event: Event) -> tuple[str, float, str, str]:
    return (event.capsule_id, event.ts, event.kind, event.message)


def _frame(body: dict[str, Any]) -> str:
    return f"event: {body['event']}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def _date(text: str | None, default: date, what: str) -> date:
    if text is None or text == "":
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise invalid(f"{what} must be a date YYYY-MM-DD, not {text!r}") from None
