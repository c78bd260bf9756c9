"""`wrenn-tui capsule metrics ID [--range 5m] [--json]`: a capsule's history from the state
DB, topped up with a few live samples when it is running.

Read-only: the live samples are shown, not saved, so a dashboard that is sampling the same
capsule remains the only writer of its stored history.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict
from typing import Any

import click

from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths, default_paths
from backend.sampler import history_codec
from backend.sampler.models import RANGES, SERIES, Sample, Target
from backend.sampler.rings import TIERS, TieredHistory, pick_tier
from backend.sampler.sampler import Sampler
from backend.sampler.sources import StaticSource

LIVE_TICKS = 3
"""The first tick only primes the VMM's CPU counter, so three give two complete samples."""
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 40
LABELS = {
    "guest_mem_used": "guest mem used",
    "guest_mem_cache": "guest mem cache",
    "guest_cpu_pct": "guest cpu",
    "host_cpu_pct": "VMM cpu (host)",
    "host_rss": "VMM rss (host)",
}


def metrics_command(
    capsule_id: str,
    range_: str = "5m",
    as_json: bool = False,
    *,
    paths: Paths | None = None,
    live_ticks: int = LIVE_TICKS,
) -> int:
    """Print the capsule's metrics over `range_` (a RANGES key); the exit code."""
    if range_ not in RANGES:
        click.echo(f"error: unknown range {range_!r}; one of {', '.join(RANGES)}", err=True)
        return 2
    store = Store((paths or default_paths()).database)
    try:
        capsule = store.get(capsule_id)
        if capsule is None:
            click.echo(f"error: no capsule {capsule_id!r} (see `wrenn-tui capsule list`)", err=True)
            return 1
        history = TieredHistory(len(SERIES))
        stored = store.get_metrics(capsule_id)
    finally:
        store.close()
    if stored:
        try:
            history_codec.decode(stored, history, SERIES)
        except history_codec.HistoryFormatError as exc:
            click.echo(f"warning: stored history ignored: {exc}", err=True)
    live: list[Sample] = []
    if capsule.state == State.RUNNING and live_ticks > 0:
        target = Target(capsule.id, capsule.envd_url, capsule.access_token or None, capsule.pid)
        live = asyncio.run(live_samples(target, live_ticks))
        for sample in live:
            history.add(sample.ts, sample.values())
    window = RANGES[range_]
    now = time.time()
    points = {name: history.points(i, window, now) for i, name in enumerate(SERIES)}
    latest = live[-1] if live else None
    step = TIERS[pick_tier(window)].step_s
    if as_json:
        click.echo(
            json.dumps(_document(capsule.id, capsule.state, range_, step, now, latest, points))
        )
    else:
        click.echo(_text(capsule.id, capsule.state, range_, step, latest, points))
    return 0


async def live_samples(target: Target, ticks: int, interval: float = 1.0) -> list[Sample]:
    """`ticks` samples of one capsule, taken on the sampler's own clock."""
    sampler = Sampler(StaticSource([target]), interval=interval)
    updates = sampler.updates()
    samples: list[Sample] = []
    await sampler.start()
    try:
        async for tick in updates:
            sample = tick.samples.get(target.capsule_id)
            if sample is not None:
                samples.append(sample)
            if len(samples) >= ticks:
                break
    finally:
        await updates.aclose()
        await sampler.stop()
    return samples


def _summary(points: list[tuple[float, float]]) -> dict[str, float | None]:
    values = [v for _, v in points]
    if not values:
        return {"min": None, "avg": None, "max": None}
    return {"min": min(values), "avg": sum(values) / len(values), "max": max(values)}


def _document(
    capsule_id: str,
    state: State,
    range_: str,
    step: float,
    now: float,
    latest: Sample | None,
    points: dict[str, list[tuple[float, float]]],
) -> dict[str, Any]:
    return {
        "capsule_id": capsule_id,
        "state": state.value,
        "range": range_,
        "window_s": RANGES[range_],
        "step_s": step,
        "now": now,
        "latest": asdict(latest) if latest is not None else None,
        "series": {
            name: {**_summary(series), "points": [[ts, v] for ts, v in series]}
            for name, series in points.items()
        },
    }


def _format(series: str, value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if series.endswith("_pct"):
        return f"{value:.1f} %"
    return f"{value / 2**20:.1f} MiB"


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """At most `width` characters, each the mean of an equal share of the values."""
    if not values:
        return ""
    groups = min(width, len(values))
    means = []
    for g in range(groups):
        chunk = values[g * len(values) // groups : (g + 1) * len(values) // groups]
        means.append(sum(chunk) / len(chunk))
    low, high = min(means), max(means)
    if high - low <= 0:
        return SPARK[0] * groups
    scale = (len(SPARK) - 1) / (high - low)
    return "".join(SPARK[round((m - low) * scale)] for m in means)


def _text(
    capsule_id: str,
    state: State,
    range_: str,
    step: float,
    latest: Sample | None,
    points: dict[str, list[tuple[float, float]]],
) -> str:
    count = max((len(p) for p in points.values()), default=0)
    lines = [f"{capsule_id} {state.value} · last {range_} · {count} points of {step:g} s"]
    if latest is not None:
        total = _format("mem", latest.guest_mem_total)
        health = (
            "ok"
            if latest.error is None
            else f"{'failing' if latest.healthy else 'unhealthy'}: {latest.error}"
        )
        lines.append(f"guest memory {total} · envd {health}")
    lines.append(f"{'':<16} {'latest':>11} {'min':>11} {'avg':>11} {'max':>11}")
    for name in SERIES:
        series = points[name]
        summary = _summary(series)
        now_value = series[-1][1] if series else None
        lines.append(
            f"{LABELS[name]:<16} {_format(name, now_value):>11} "
            f"{_format(name, summary['min']):>11} {_format(name, summary['avg']):>11} "
            f"{_format(name, summary['max']):>11}  {sparkline([v for _, v in series])}"
        )
    if count == 0:
        lines.append(
            "no samples in this range"
            + ("" if state == State.RUNNING else f" (the capsule is {state.value})")
        )
    return "\n".join(lines)
