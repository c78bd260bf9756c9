"""Benchmark the metrics sampler against N real envds: ``python -m bench.sampler`` prints one
JSON object, ``{"runs": [{"n", "agent_cpu_pct", "tick_p50_ms", "tick_p99_ms", "missed_ticks",
"requests_per_s", ...}, ...], "machine": {...}}``.

The envds run on this host in host mode (``--root`` a temporary directory each), started in
batches before anything is measured and left to settle; each stands in for one capsule, its
own process for the VMM whose CPU and RSS the sampler reads with psutil. Sizes run smallest
first and reuse the envds already started. Each envd costs ~35 MB, so a size that does not
fit in the available memory (minus a reserve) runs with as many as fit, and its run says so.

- ``agent_cpu_pct``: CPU time of this process (the sampler only; envds are other processes)
  over the measured seconds, in % of one core.
- ``tick_p50_ms`` / ``tick_p99_ms`` / ``missed_ticks`` / ``requests_per_s``: the sampler's own
  SamplerStats, reset after a warm-up (first connections, psutil priming).
- ``envd_cpu_pct``: all envds together, % of one core: the competition on this machine.
- ``failed_samples`` / ``failed_ticks`` / ``errors``: samples without envd figures during the
  measured seconds, the ticks they fell in, and the commonest reasons.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from backend.sampler import Sampler, StaticSource, Target, Tick
from tests import hostenvd
from tests.hostenvd import HostEnvd

DEFAULT_SIZES = (10, 120, 500)
ENVD_RSS_ESTIMATE = 40 << 20
MEMORY_RESERVE = 2 << 30
"""Left free for the system and the other work on this machine."""
BATCH = 20
"""envds started at once: more only make each other's imports slower on two cores."""
WARMUP_S = 3.0
SETTLE_S = 5.0


def _die_with_parent() -> None:
    """In the child before exec: envds left behind by a killed bench would skew the next run,
    so the kernel sends them SIGTERM when the bench goes (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class EnvdFleet:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.envds: list[HostEnvd] = []
        self._spawned = 0

    def _spawn(self) -> HostEnvd:
        self._spawned += 1
        root = self.workdir / f"root-{self._spawned}"
        return hostenvd.spawn(
            root, "--log-level", "warning", cls=HostEnvd, preexec_fn=_die_with_parent
        )

    def _healthy(self, batch: list[HostEnvd], deadline_s: float = 60.0) -> list[HostEnvd]:
        ready: list[HostEnvd] = []
        pending = list(batch)
        deadline = time.monotonic() + deadline_s
        with httpx.Client(timeout=1.0) as client:
            while pending and time.monotonic() < deadline:
                for envd in list(pending):
                    if envd.proc.poll() is not None:
                        pending.remove(envd)
                        self._report(envd, f"exited with {envd.proc.returncode}")
                        continue
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(f"{envd.url}/health").status_code == 200:
                            pending.remove(envd)
                            ready.append(envd)
                if pending:
                    time.sleep(0.1)
        for envd in pending:
            envd.proc.kill()
            envd.proc.wait()
            self._report(envd, f"not healthy within {deadline_s:g} s")
        return ready

    def _report(self, envd: HostEnvd, what: str) -> None:
        print(f"envd on port {envd.port} {what}:\n{envd.log()[-1500:]}", file=sys.stderr)

    def grow_to(self, n: int) -> str | None:
        """Start envds until there are n; a note when memory (or failures) stopped it."""
        failures = 0
        while len(self.envds) < n:
            available = psutil.virtual_memory().available - MEMORY_RESERVE
            fits = max(0, available // ENVD_RSS_ESTIMATE)
            count = min(BATCH, n - len(self.envds), fits)
            if count <= 0:
                return (
                    f"memory allows {len(self.envds)} envds of ~{ENVD_RSS_ESTIMATE >> 20} MB "
                    f"(keeping {MEMORY_RESERVE >> 30} GB free), not {n}"
                )
            batch = [self._spawn() for _ in range(count)]
            ready = self._healthy(batch)
            self.envds.extend(ready)
            # A lost race for a free port is retried; a steady failure is not.
            failures += len(batch) - len(ready)
            if failures > 5:
                return f"{failures} envds failed to start (see stderr); ran with {len(self.envds)}"
        return None

    def children_cpu_s(self) -> float:
        total = 0.0
        for envd in self.envds:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(envd.proc.pid).cpu_times()
                total += times.user + times.system
        return total

    def rss_mb(self) -> float:
        total = 0
        for envd in self.envds:
            with contextlib.suppress(psutil.Error):
                total += psutil.Process(envd.proc.pid).memory_info().rss
        return round(total / 2**20, 1)

    def stop(self) -> None:
        for envd in self.envds:
            envd.proc.terminate()
        for envd in self.envds:
            try:
                envd.proc.wait(10)
            except subprocess.TimeoutExpired:
                envd.proc.kill()
                envd.proc.wait(10)
        self.envds.clear()


@contextlib.contextmanager
def fleet() -> Iterator[EnvdFleet]:
    with tempfile.TemporaryDirectory(prefix="bench-sampler-") as tmp:
        envds = EnvdFleet(Path(tmp))
        try:
            yield envds
        finally:
            envds.stop()


async def measure(envds: list[HostEnvd], seconds: float) -> dict[str, Any]:
    targets = [Target(f"cl-bench{i:04d}", e.url, None, e.proc.pid) for i, e in enumerate(envds)]
    sampler = Sampler(StaticSource(targets))
    errors: Counter[str] = Counter()
    failed_ticks = 0
    measuring = False

    def on_tick(tick: Tick) -> None:
        nonlocal failed_ticks
        if measuring:
            failed = [s.error for s in tick.samples.values() if s.error is not None]
            errors.update(failed)
            failed_ticks += bool(failed)

    sampler.subscribe(on_tick)
    await sampler.start()
    try:
        await asyncio.sleep(WARMUP_S)
        sampler.reset_stats()
        measuring = True
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        stats = sampler.stats
    finally:
        await sampler.stop()
    return {
        "agent_cpu_pct": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 2),
        "tick_p50_ms": stats.tick_p50_ms,
        "tick_p99_ms": stats.tick_p99_ms,
        "missed_ticks": stats.missed_ticks,
        "requests_per_s": stats.requests_per_s,
        "ticks": stats.ticks,
        "failed_samples": sum(errors.values()),
        "failed_ticks": failed_ticks,
        "errors": dict(errors.most_common(3)),
    }


def run(sizes: list[int], seconds: float, settle: float) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with fleet() as envds:
        for n in sorted(sizes):
            note = envds.grow_to(n)
            time.sleep(settle)
            children0, wall0 = envds.children_cpu_s(), time.perf_counter()
            result = asyncio.run(measure(envds.envds, seconds))
            envd_cpu = envds.children_cpu_s() - children0
            wall = time.perf_counter() - wall0
            entry: dict[str, Any] = {"n": len(envds.envds), **result}
            entry["seconds"] = seconds
            entry["envd_cpu_pct"] = round(100 * envd_cpu / wall, 1)
            entry["envd_rss_mb"] = envds.rss_mb()
            # Other work on this machine competes with both; the 1 min load says how much.
            entry["loadavg_1m"] = round(os.getloadavg()[0], 2)
            if note is not None:
                entry["requested_n"] = n
                entry["note"] = note
            runs.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
            if note is not None:
                break
    memory = psutil.virtual_memory()
    return {
        "runs": runs,
        "machine": {
            "cpus": os.cpu_count(),
            "mem_total_mb": memory.total >> 20,
            "python": platform.python_version(),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sampler", description=__doc__)
    parser.add_argument("--n", type=int, action="append", help="capsules (repeatable)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured per size")
    parser.add_argument("--settle", type=float, default=SETTLE_S, help="after starting envds")
    args = parser.parse_args(argv)
    sizes = args.n or list(DEFAULT_SIZES)
    print(json.dumps(run(sizes, args.seconds, args.settle)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
