"""Density benchmark: what an idle capsule costs the host, in one run.

    python -m bench.density [--counts 1,4,16] [--idle 20]

For each N: N idle 256 MiB capsules made by warm create, left idle, then measured. Prints one
JSON object. Two measures of host memory per capsule, because this machine is shared:
- `host_mib_per_idle_capsule` (the issue's measure): the drop in the host's MemAvailable from
  before the capsules to after the idle period, host page cache dropped before each reading,
  divided by N. Other processes starting or stopping meanwhile move it.
- `accounted_mib_per_idle_capsule`: what the capsules' own processes and files hold, summed:
  each QEMU's proportional set size (/proc/PID/smaps_rollup `Pss`, shared pages split among
  the processes mapping them) plus the part of its RAM file in /dev/shm that no process maps
  (a tmpfs page costs the host whether or not it is mapped). Unaffected by other processes.
Also per capsule: the RAM file's allocation, QEMU's RSS, the guest's own use (MemTotal -
MemAvailable from envd /metrics), and the size of an idle capsule's pause (`snapshot_idle_mib`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from backend.capsules.manager import TRIM_DELAY_S, CapsuleManager
from bench.lifecycle import scratch_paths

MIB = 1 << 20


def _drop_host_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: the reading includes page cache changes


def _mem_available() -> int:
    _drop_host_caches()
    time.sleep(0.5)
    return psutil.virtual_memory().available


def _smaps_rollup(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return out


async def _measure(manager: CapsuleManager, n: int, idle_s: float) -> dict[str, Any]:
    before = _mem_available()
    shared_before = manager.bases.allocated_bytes()
    started = time.monotonic()
    capsules = [await manager.create() for _ in range(n)]
    create_s = time.monotonic() - started
    await asyncio.sleep(idle_s)
    # the template's memfd before the host drops its caches: pages faulted into it by clones
    # (a first write to a page that is a hole in the template reads it first) and no longer
    # mapped are clean and go with drop_caches; without swap nothing else reclaims them
    undropped = manager.bases.allocated_bytes()
    after = _mem_available()
    own, rss, ram_files, guest_used = [], [], [], []
    for c in capsules:
        assert c.pid is not None
        ram = manager.layout.ram_file(c.id)
        allocated = ram.stat().st_blocks * 512 if ram.exists() else 0
        roll = _smaps_rollup(c.pid)
        # the process's own memory; guest RAM held in files (tmpfs, memfd) is counted below,
        # once, whoever maps it
        own.append(roll["Pss"] - roll.get("Pss_Shmem", 0))
        rss.append(roll["Rss"])
        ram_files.append(allocated)
        async with manager.envd(c) as envd:
            m = await envd.metrics(timeout=5)
        guest_used.append(int(m.get("mem_used", 0)))
    shared = manager.bases.allocated_bytes()
    accounted = sum(own) + sum(ram_files) + shared
    out = {
        "n": n,
        "clones": manager.clones,
        "create_each_s": round(create_s / n, 3),
        "host_mib_per_idle_capsule": round((before - after) / n / MIB, 1),
        "accounted_mib_per_idle_capsule": round(accounted / n / MIB, 1),
        "qemu_own_mib": round(statistics.mean(own) / MIB, 1),
        "qemu_rss_mib": round(statistics.mean(rss) / MIB, 1),
        "ram_file_mib": round(statistics.mean(ram_files) / MIB, 1),
        "template_ram_mib": round(shared / MIB, 1),
        "template_ram_new_mib": round((shared - shared_before) / MIB, 1),
        "template_ram_before_drop_caches_mib": round(undropped / MIB, 1),
        "guest_used_mib": round(statistics.mean(guest_used) / MIB, 1),
    }
    for c in capsules:
        await manager.destroy(c.id)
    return out


async def _burst(manager: CapsuleManager, n: int) -> dict[str, Any]:
    async def one() -> float:
        t = time.monotonic()
        await manager.create()
        return time.monotonic() - t

    started = time.monotonic()
    each = sorted(await asyncio.gather(*(one() for _ in range(n))))
    total = time.monotonic() - started
    healthy = 0
    for c in manager.list_capsules():
        healthy += (await manager.exec(c.id, "true")).exit_code == 0
        await manager.destroy(c.id)
    return {
        f"burst_create_{n}_s": round(total, 3),
        f"burst_create_{n}_healthy": healthy,
        f"burst_create_{n}_p50_s": round(each[len(each) // 2], 3),
        f"burst_create_{n}_p99_s": round(each[min(len(each) - 1, int(len(each) * 0.99))], 3),
    }


async def run(
    counts: list[int], idle_s: float, burst: int, compare: bool, lifecycle: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {"memory_mib": 256, "idle_s": idle_s}
    root = Path(tempfile.mkdtemp(prefix="wd-", dir="/tmp"))
    manager = CapsuleManager(scratch_paths(root))
    await manager.start(watchdog=False)
    try:
        warm = await manager.create()  # the warm snapshot exists (built once if not)
        await asyncio.sleep(idle_s)
        snap = await manager.pause(warm.id)
        out["snapshot_idle_mib"] = round(snap.total_allocated / MIB, 1)
        out["snapshot_idle_ram_mib"] = round(snap.ram_allocated / MIB, 1)
        out["snapshot_idle_state_mib"] = round(snap.state_size / MIB, 1)
        t = time.monotonic()
        await manager.resume(warm.id)
        out["resume_idle_s"] = round(time.monotonic() - t, 3)
        await manager.destroy(warm.id)
        # a pause reads every page of a clone: the template's holes become (shared) pages of
        # its memfd, which the trim gives back TRIM_DELAY_S after the pause; measured before
        # the densities, so each N carries what is left
        await asyncio.sleep(TRIM_DELAY_S + 1)
        out["template_ram_after_first_pause_mib"] = round(manager.bases.allocated_bytes() / MIB, 1)
        out["by_n"] = [await _measure(manager, n, idle_s) for n in counts]
        last = out["by_n"][-1]
        out["host_mib_per_idle_capsule"] = last["host_mib_per_idle_capsule"]
        out["accounted_mib_per_idle_capsule"] = last["accounted_mib_per_idle_capsule"]
        if burst:
            out.update(await _burst(manager, burst))
    finally:
        for leftover in manager.list_capsules():
            await manager.destroy(leftover.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)
    if compare:
        # before issue 21, in the same run: every capsule a private copy of the template's RAM
        root = Path(tempfile.mkdtemp(prefix="wd-", dir="/tmp"))
        manager = CapsuleManager(scratch_paths(root), clones=False)
        await manager.start(watchdog=False)
        try:
            out["private_copies"] = await _measure(manager, max(counts), idle_s)
        finally:
            for leftover in manager.list_capsules():
                await manager.destroy(leftover.id)
            await manager.close()
            shutil.rmtree(root, ignore_errors=True)
    out["targets"] = {
        "host_mib_per_idle_capsule<=48": out["host_mib_per_idle_capsule"] <= 48,
        "accounted_mib_per_idle_capsule<=48": out["accounted_mib_per_idle_capsule"] <= 48,
        "snapshot_idle_mib<=48": out["snapshot_idle_mib"] <= 48,
    }
    if burst:
        out["targets"][f"burst_create_{burst}_all_healthy"] = (
            out[f"burst_create_{burst}_healthy"] == burst
        )
    if lifecycle:
        # bench.lifecycle's targets in the same run (pause, resume, warm create, ...)
        from bench import lifecycle as lifecycle_bench

        out["lifecycle"] = await lifecycle_bench.run(256, 3)
        for name, met in out["lifecycle"]["targets"].items():
            out["targets"][f"lifecycle:{name}"] = met
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--counts", default="1,4,16")
    parser.add_argument("--idle", type=float, default=20.0)
    parser.add_argument("--burst", type=int, default=16, help="0: skip the burst of creates")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also measure the largest N with private RAM copies (before issue 21)",
    )
    parser.add_argument(
        "--no-lifecycle", action="store_true", help="skip bench.lifecycle's run and targets"
    )
    args = parser.parse_args()
    counts = [int(x) for x in args.counts.split(",")]
    result = asyncio.run(run(counts, args.idle, args.burst, args.compare, not args.no_lifecycle))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
