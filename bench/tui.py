"""Dashboard benchmark: the 1 s table update and keypress latency with many live capsules.

    python -m bench.tui [--capsules 120] [--ticks 40] [--presses 120] [--size 80x24]

Each capsule row is backed by a real envd process on the host (host mode), polled by the real
sampler once a second (its requests on the sampler's own thread, its ticks on the app's loop).
The app runs headless at 200x60, or `--size`.

update_*: time the table's tick handler takes (re-read the capsules, gather the figures, update
the cells and sparklines, re-sort, status line), from the screen's own instrumentation.
keypress_*: from sending `j`/`k` until the compositor has painted a frame showing the moved
cursor, with the presses spread over the tick phase. frame_*: the compositor's time to draw one
frame (a tick's frame redraws every visible row, a keypress's only two). loop_lag_*: how late a
10 ms timer fires in the same event loop, and host_load_1m / host_cpu_busy_pct /
dashboard_process_cores (the app and its sampler) say how much of a keypress is spent waiting
for its turn. pty_5mb_s / table_updates_during_pty (of table_updates_expected): `s` opens the
selected capsule's shell pane under the table and 5 MB of base64 goes through it while the
table keeps updating. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
from rich.console import RenderableType
from textual.screen import Screen

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from backend.config import Paths, default_paths
from backend.sampler import ManagerSource, Sampler
from bench.pty_tui import FLOOD, MARKER, painted, until
from tests import hostenvd
from tui.app import WrennApp
from tui.terminal import TerminalPane
from tui.widgets.sparkline import BLOCKS

DEFAULT_SIZE = (200, 60)


def scratch_paths(root: Path) -> Paths:
    base = default_paths()
    return Paths(
        data=base.data, state=root / "state", cache=base.cache, config=root / "config", shm=base.shm
    )


def start_envds(count: int, root: Path) -> list[tuple[subprocess.Popen[bytes], int]]:
    """All at once (an envd takes ~1 s to import), then wait for every /health."""
    envds = hostenvd.start_many(count, root, timeout=180)
    return [(envd.proc, envd.port) for envd in envds]


async def loop_lag(lags: list[float], interval: float = 0.01) -> None:
    """How late a 10 ms timer fires: the wait any event (a keypress) has in the shared loop."""
    while True:
        due = time.perf_counter() + interval
        await asyncio.sleep(interval)
        lags.append(max(0.0, time.perf_counter() - due) * 1000)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def measure(
    manager: CapsuleManager,
    sampler: Sampler,
    ticks: int,
    presses: int,
    size: tuple[int, int] = DEFAULT_SIZE,
) -> dict[str, Any]:
    app = WrennApp(manager=manager, sampler=sampler, accel="tcg", cursor_blink=False)
    frames: list[tuple[float, int]] = []
    display = app._display

    def recording_display(screen: Screen[Any], renderable: RenderableType | None) -> None:
        display(screen, renderable)
        if renderable is not None:
            frames.append((time.perf_counter(), app.main_screen.table.cursor_row))

    app._display = recording_display  # type: ignore[method-assign]
    frame_ms: list[float] = []
    compose_frame = Screen._compositor_refresh

    def timed_frame(screen: Screen[Any]) -> None:
        started = time.perf_counter()
        compose_frame(screen)
        frame_ms.append((time.perf_counter() - started) * 1000)

    Screen._compositor_refresh = timed_frame  # type: ignore[method-assign,assignment]
    async with app.run_test(size=size) as pilot:
        main = app.main_screen
        table = main.table
        count = len(manager.list_capsules())

        def filled() -> bool:
            """Every capsule sampled, and the rows on screen drawn with a few seconds of it."""
            if table.row_count != count:
                return False
            capsules = manager.list_capsules()
            if any(sampler.latest(c.id) is None for c in capsules):
                return False
            visible = min(count, size[1] - 5)
            return all(
                sum(ch in BLOCKS for ch in str(getattr(cell, "plain", cell))) >= 3
                for cell in (table.get_cell(row.key, "mem") for row in table.ordered_rows[:visible])
            )

        deadline = time.monotonic() + 120
        while not filled():
            if time.monotonic() > deadline:
                raise RuntimeError("the sparklines did not fill within 120 s")
            await pilot.pause(0.1)

        main.update_ms.clear()
        frame_ms.clear()
        sampler.reset_stats()
        psutil.cpu_percent()
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        lags: list[float] = []
        probe = asyncio.create_task(loop_lag(lags))
        latencies: list[float] = []
        rng = random.Random(6)
        for index in range(presses):
            key = "j" if (index // 25) % 2 == 0 else "k"
            step = 1 if key == "j" else -1
            expected = min(max(table.cursor_row + step, 0), table.row_count - 1)
            sent = time.perf_counter()
            await pilot.press(key)
            while True:
                shown = [ts for ts, row in frames if ts >= sent and row == expected]
                if shown:
                    latencies.append((shown[0] - sent) * 1000)
                    break
                if time.perf_counter() - sent > 5:
                    raise RuntimeError(f"no frame showed the cursor on row {expected}")
                await asyncio.sleep(0.001)
            frames.clear()
            await asyncio.sleep(rng.uniform(0.05, 0.3))
        while len(main.update_ms) < ticks:
            await pilot.pause(0.2)
        updates = list(main.update_ms)
        frames_drawn = list(frame_ms)
        host_busy = psutil.cpu_percent()
        own_cpu = (time.process_time() - cpu_started) / (time.perf_counter() - wall_started)
        probe.cancel()
        stats = sampler.stats  # before the flood, which holds the loop the ticks finish on
        pty = await pty_flood(pilot, main)
    Screen._compositor_refresh = compose_frame  # type: ignore[method-assign]
    return {
        "n": count,
        "update_p50_ms": round(statistics.median(updates), 2),
        "update_p99_ms": round(percentile(updates, 0.99), 2),
        "update_max_ms": round(max(updates), 2),
        "updates": len(updates),
        "keypress_p50_ms": round(statistics.median(latencies), 2),
        "keypress_p99_ms": round(percentile(latencies, 0.99), 2),
        "keypress_max_ms": round(max(latencies), 2),
        "keypresses": len(latencies),
        "frame_p50_ms": round(statistics.median(frames_drawn), 2),
        "frame_p99_ms": round(percentile(frames_drawn, 0.99), 2),
        "loop_lag_p50_ms": round(statistics.median(lags), 2),
        "loop_lag_p99_ms": round(percentile(lags, 0.99), 2),
        "sampler_tick_p99_ms": round(stats.tick_p99_ms, 2),
        "dashboard_process_cores": round(own_cpu, 2),
        "host_cpu_busy_pct": host_busy,
        "sampler_missed_ticks": stats.missed_ticks,
        **pty,
        "size": list(size),
    }


async def pty_flood(pilot: Any, main: Any) -> dict[str, Any]:
    """`s` on the selected capsule opens its shell pane below the table (a real PTY in that
    capsule's envd); then 5 MB of base64 goes through it while the table keeps its 1 s
    updates. pty_5mb_s: from sending the command until the pane paints the end marker;
    table_updates_during_pty against the flood's whole seconds."""
    await pilot.press("s")
    await until(lambda: bool(main.query(TerminalPane)), 10, "the shell pane")
    pane = main.query_one(TerminalPane)
    await until(lambda: painted(pane).strip() != "", 20, "the shell prompt")
    await asyncio.sleep(1.0)
    updated: list[float] = []
    refresh = main._refresh_rows

    def counted() -> None:
        refresh()
        updated.append(time.monotonic())

    main._refresh_rows = counted
    try:
        started = time.monotonic()
        await pane.send(FLOOD + "\r")
        await until(lambda: MARKER in painted(pane), 300, "the flood's end", poll=0.01)
        flood_s = time.monotonic() - started
    finally:
        main._refresh_rows = refresh
    return {
        "pty_5mb_s": round(flood_s, 3),
        "table_updates_during_pty": sum(1 for ts in updated if ts >= started),
        "table_updates_expected": int(flood_s),
    }


async def run(
    capsules: int, ticks: int, presses: int, size: tuple[int, int] = DEFAULT_SIZE
) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="wb-tui-", dir="/tmp"))
    envds: list[tuple[subprocess.Popen[bytes], int]] = []
    try:
        load_before = os.getloadavg()[0]
        started = time.monotonic()
        envds = start_envds(capsules, root)
        envd_start_s = time.monotonic() - started
        paths = scratch_paths(root)
        manager = CapsuleManager(paths)
        now = time.time()
        for index, (_, port) in enumerate(envds):
            manager.store.put(
                Capsule(
                    id=f"cl-bench{index:07d}",
                    state=State.RUNNING,
                    template="default",
                    image_dir=str(paths.image_dir("default")),
                    memory_mib=256,
                    vcpus=1,
                    created_at=now + index,
                    host_port=port,
                    access_token="",
                    started_at=now,
                )
            )
        sampler = Sampler(ManagerSource(manager), store=manager.store)
        await sampler.start()
        try:
            result = await measure(manager, sampler, ticks, presses, size)
        finally:
            await sampler.stop()
            await manager.close()
        result["envd_start_s"] = round(envd_start_s, 1)
        result["host_load_1m"] = [round(load_before, 1), round(os.getloadavg()[0], 1)]
        result["host_cpus"] = os.cpu_count()
        return result
    finally:
        for proc, _ in envds:
            proc.terminate()
        for proc, _ in envds:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capsules", type=int, default=120)
    parser.add_argument("--ticks", type=int, default=40)
    parser.add_argument("--presses", type=int, default=120)
    parser.add_argument(
        "--size", default="200x60", help="terminal COLUMNSxROWS, e.g. 80x24 (default 200x60)"
    )
    args = parser.parse_args()
    columns, _, rows = args.size.partition("x")
    size = (int(columns), int(rows))
    print(json.dumps(asyncio.run(run(args.capsules, args.ticks, args.presses, size))))


if __name__ == "__main__":
    main()
