"""Benchmark a real envd on this host: ``python -m bench.envd`` prints one JSON object.

envd runs as a subprocess in host mode (``--root`` a temporary directory). For the HTTP
figures it is pinned to one core and the load generator to the others, so the numbers are
envd's, not the client's. Measured:

- ``metrics_rps`` (+ ``metrics_raw_p50_ms`` / ``metrics_raw_p99_ms``): GET /metrics
  throughput with 100 keep-alive connections driven by a minimal asyncio HTTP/1.1 client,
  whose own cost per request is far below httpx's.
- ``metrics_p50_ms`` / ``metrics_p99_ms`` (+ ``metrics_httpx_rps``): latency with 100
  concurrent ``httpx.AsyncClient`` clients in a closed loop.
- ``metrics_200rps_p50_ms`` / ``metrics_200rps_p99_ms`` / ``_max_ms``: an open loop paced
  at 200 req/s over 32 keep-alive connections of the minimal client; requests do not wait
  for earlier answers, so a stall shows up in every request that arrives during it.
- ``pty_mb_s``: terminal output delivered to a WebSocket client, for
  ``head -c N /dev/zero | base64`` (76-column lines), with ``pty_kernel_mb_s`` the same
  command read straight from a PTY in this process (the kernel's ceiling on this machine,
  whose newline processing dominates) and ``pty_nowrap_mb_s`` for ``base64 -w0``.
- ``echo_p50_ms`` / ``echo_p99_ms``: one keystroke to ``cat`` on a raw-mode terminal and back.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import connect

from tests import hostenvd
from tests.hostenvd import HostEnvd

if importlib.util.find_spec("sniffio") is None:
    # httpcore retries `import sniffio` on every async request, and a failed import scans
    # sys.path each time (~3 ms here). A None entry makes the miss instant; httpcore then
    # assumes asyncio, as it would anyway.
    sys.modules["sniffio"] = None  # type: ignore[assignment]

CONCURRENCY = 100
PACED_RATE = 200.0


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


@contextlib.contextmanager
def running_envd(root: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, float]]:
    """A host envd; yields its process, URL and the seconds it took to answer /health."""
    started = time.monotonic()
    envd = hostenvd.spawn(root, "--log-level", "warning", cls=HostEnvd, keep_log=False)
    try:
        hostenvd.wait_healthy([envd], timeout=30, poll_s=0.02)
        yield envd.proc, envd.url, time.monotonic() - started
    finally:
        envd.stop()


@contextlib.contextmanager
def pinned(envd_pid: int) -> Iterator[bool]:
    """envd on one core, this process on the rest (when there are at least two)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        yield False
        return
    os.sched_setaffinity(envd_pid, {cpus[0]})
    os.sched_setaffinity(0, set(cpus[1:]))
    try:
        yield True
    finally:
        os.sched_setaffinity(envd_pid, set(cpus))
        os.sched_setaffinity(0, set(cpus))


class RawHttp:
    """Keep-alive HTTP/1.1 GETs over plain asyncio streams; costs far less per request than
    httpx, so the figures are envd's."""

    def __init__(self, port: int) -> None:
        self.port = port

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    async def get(
        self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str
    ) -> bytes:
        reader, writer = conn
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = await reader.readexactly(length)
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"bad response: {head[:40]!r}")
        return body


async def raw_metrics_rps(port: int, duration: float) -> dict[str, float]:
    http = RawHttp(port)
    latencies: list[float] = []
    stop_at = time.monotonic() + duration

    async def worker() -> None:
        conn = await http.open()
        try:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                await http.get(conn, "/metrics")
                latencies.append(time.perf_counter() - t0)
        finally:
            conn[1].close()

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    elapsed = time.monotonic() - started
    return {
        "metrics_rps": round(len(latencies) / elapsed, 1),
        "metrics_rps_requests": len(latencies),
        "metrics_raw_p50_ms": ms(percentile(latencies, 50)),
        "metrics_raw_p99_ms": ms(percentile(latencies, 99)),
    }


async def httpx_closed_loop(url: str, duration: float) -> dict[str, float]:
    # One client (and so one connection) per simulated caller: a single shared pool of 100
    # connections spends its time in httpcore's pool bookkeeping, not in envd.
    clients = [httpx.AsyncClient(base_url=url, timeout=30) for _ in range(CONCURRENCY)]
    latencies: list[float] = []
    try:
        await asyncio.gather(*(c.get("/health") for c in clients))
        stop_at = time.monotonic() + duration

        async def worker(client: httpx.AsyncClient) -> None:
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                r = await client.get("/metrics")
                latencies.append(time.perf_counter() - t0)
                r.raise_for_status()

        started = time.monotonic()
        await asyncio.gather(*(worker(c) for c in clients))
        elapsed = time.monotonic() - started
    finally:
        for c in clients:
            await c.aclose()
    return {
        "metrics_httpx_rps": round(len(latencies) / elapsed, 1),
        "metrics_p50_ms": ms(percentile(latencies, 50)),
        "metrics_p99_ms": ms(percentile(latencies, 99)),
    }


async def paced(port: int, rate: float, count: int) -> dict[str, float]:
    http = RawHttp(port)
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(32):
        pool.put_nowait(await http.open())
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.05

    async def one(scheduled: float) -> None:
        await asyncio.sleep(max(0.0, scheduled - loop.time()))
        # Timed from the wake-up, not the schedule: the event loop's timers fire up to a
        # millisecond late, which is the client's lateness, not envd's. Waiting for a free
        # connection (when envd is slow to answer earlier requests) is counted.
        t0 = time.perf_counter()
        conn = await pool.get()
        await http.get(conn, "/metrics")
        latencies.append(time.perf_counter() - t0)
        pool.put_nowait(conn)

    await asyncio.gather(*(one(start + i / rate) for i in range(count)))
    while not pool.empty():
        pool.get_nowait()[1].close()
    return {
        "metrics_200rps_requests": count,
        "metrics_200rps_p50_ms": ms(percentile(latencies, 50)),
        "metrics_200rps_p99_ms": ms(percentile(latencies, 99)),
        "metrics_200rps_max_ms": ms(max(latencies)),
    }


async def pty_throughput(ws_url: str, command: str) -> tuple[float, int]:
    async with connect(ws_url, max_size=None, compression=None) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "start",
                    "cmd": "/bin/sh",
                    "args": ["-c", command],
                    "cols": 200,
                    "rows": 50,
                }
            )
        )
        received = 0
        started = None
        async with asyncio.timeout(120):
            while True:
                message = json.loads(await ws.recv())
                if message["type"] == "output":
                    if started is None:
                        started = time.perf_counter()
                    received += len(message["data"].encode())
                elif message["type"] == "exit":
                    break
                elif message["type"] == "error":
                    raise RuntimeError(message)
        elapsed = time.perf_counter() - (started or time.perf_counter())
    return received / elapsed / 1e6, received


def kernel_pty_throughput(command: str) -> float:
    master, slave = os.openpty()
    proc = subprocess.Popen(
        ["/bin/sh", "-c", command], stdin=slave, stdout=slave, stderr=slave, start_new_session=True
    )
    os.close(slave)
    received = 0
    started = None
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            if started is None:
                started = time.perf_counter()
            received += len(data)
    finally:
        os.close(master)
        proc.wait()
    return received / (time.perf_counter() - (started or time.perf_counter())) / 1e6


async def echo_latency(ws_url: str, samples: int) -> dict[str, float]:
    latencies: list[float] = []
    async with connect(ws_url, max_size=None, compression=None) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "start",
                    "cmd": "/bin/sh",
                    "args": ["-c", "stty raw -echo; echo ready; exec cat"],
                }
            )
        )

        async def until(text: str) -> None:
            seen = ""
            async with asyncio.timeout(10):
                while text not in seen:
                    message = json.loads(await ws.recv())
                    if message["type"] == "output":
                        seen += message["data"]

        await until("ready")
        for i in range(samples):
            char = "abcdefghijklmnopqrstuvwxyz"[i % 26]
            t0 = time.perf_counter()
            await ws.send(json.dumps({"type": "input", "data": char}))
            await until(char)
            latencies.append(time.perf_counter() - t0)
        await ws.send(json.dumps({"type": "kill"}))
    return {
        "echo_samples": samples,
        "echo_p50_ms": ms(percentile(latencies, 50)),
        "echo_p99_ms": ms(percentile(latencies, 99)),
        "echo_mean_ms": ms(statistics.fmean(latencies)),
    }


def main() -> int:
    results: dict[str, Any] = {"host_cpus": os.cpu_count()}
    wrapped = "head -c 30000000 /dev/zero | base64"
    nowrap = "head -c 60000000 /dev/zero | base64 -w0"
    with (
        tempfile.TemporaryDirectory(prefix="envd-bench-") as tmp,
        running_envd(Path(tmp) / "root") as (proc, url, startup),
    ):
        results["envd_start_s"] = round(startup, 3)
        port = int(url.rsplit(":", 1)[1])
        ws_url = f"ws://127.0.0.1:{port}/pty"
        with pinned(proc.pid) as is_pinned:
            results["envd_pinned_to_one_core"] = is_pinned
            results.update(asyncio.run(raw_metrics_rps(port, duration=5.0)))
            results.update(asyncio.run(httpx_closed_loop(url, duration=5.0)))
            results.update(asyncio.run(paced(port, PACED_RATE, count=1000)))
        mb_s, received = asyncio.run(pty_throughput(ws_url, wrapped))
        results["pty_mb_s"] = round(mb_s, 1)
        results["pty_bytes"] = received
        results["pty_kernel_mb_s"] = round(kernel_pty_throughput(wrapped), 1)
        results["pty_nowrap_mb_s"] = round(asyncio.run(pty_throughput(ws_url, nowrap))[0], 1)
        results.update(asyncio.run(echo_latency(ws_url, samples=300)))
    results["targets_met"] = {
        "metrics_200rps_p99_ms<=5": results["metrics_200rps_p99_ms"] <= 5.0,
        "pty_mb_s>=20": results["pty_mb_s"] >= 20.0,
    }
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
