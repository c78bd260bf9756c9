"""Lifecycle benchmark: cold boot, warm create, pause, resume and snapshot sizes, in one run.

    python -m bench.lifecycle [--memory 256]

Prints one JSON object. Sizes are bytes allocated on disk by a snapshot generation (RAM file +
device state + disk overlay). Pause, resume and the snapshot sizes are of a capsule made by
create, a clone of the template (its snapshot is a diff on the template's RAM: no RAM file);
`pause_full_s`, `resume_full_s` and `snapshot_full_idle_bytes` of the cold-booted capsule, which
has a RAM file of its own. The 200 MB "file" is read from the guest's root block device
(`dd if=/dev/vda`), so it fills the page cache without growing the capsule's disk overlay and the
three snapshots differ only in what the page cache costs.
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

from backend.capsules.manager import CapsuleManager
from backend.capsules.snapshots import SnapshotManifest
from backend.config import Paths, default_paths

READ_200MB = "dd if=/dev/vda of=/dev/null bs=1M count=200 status=none"


def scratch_paths(root: Path) -> Paths:
    base = default_paths()
    return Paths(
        data=base.data, state=root / "state", cache=base.cache, config=root / "config", shm=base.shm
    )


async def run(memory_mib: int, cycles: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="wb-", dir="/tmp"))
    manager = CapsuleManager(scratch_paths(root))
    await manager.start(watchdog=False)
    out: dict[str, Any] = {"memory_mib": memory_mib}
    try:
        started = time.monotonic()
        capsule = await manager.create(memory_mib=memory_mib, cold=True)
        out["cold_boot_s"] = round(time.monotonic() - started, 3)
        out["accel"] = capsule.accel

        # warm creates: the template snapshot of this size exists after the first one
        first = await manager.create(memory_mib=memory_mib)
        await manager.destroy(first.id)
        warm = []
        for _ in range(3):
            t = time.monotonic()
            clone = await manager.create(memory_mib=memory_mib)
            warm.append(time.monotonic() - t)
            assert clone.extra.get("start") == "warm", clone.extra
            await manager.destroy(clone.id)
        out["create_warm_s"] = round(statistics.median(warm), 3)
        t = time.monotonic()
        batch = await asyncio.gather(*(manager.create(memory_mib=memory_mib) for _ in range(8)))
        out["create_8_at_once_s"] = round(time.monotonic() - t, 3)
        healthy = 0
        for clone in batch:
            healthy += (await manager.exec(clone.id, "true")).exit_code == 0
            await manager.destroy(clone.id)
        out["create_8_at_once_healthy"] = healthy
        # the cold-booted capsule has a RAM file of its own: a full snapshot
        await asyncio.sleep(2)
        t = time.monotonic()
        full = await manager.pause(capsule.id)
        out["pause_full_s"] = round(time.monotonic() - t, 3)
        out["snapshot_full_idle_bytes"] = full.total_allocated
        t = time.monotonic()
        await manager.resume(capsule.id)
        out["resume_full_s"] = round(time.monotonic() - t, 3)
        await manager.destroy(capsule.id)

        # what create gives: a clone of the template, whose pauses are diffs on it
        capsule = await manager.create(memory_mib=memory_mib)
        await asyncio.sleep(2)  # let boot-time page cache settle into a steady idle state

        pauses, resumes = [], []
        idle = None
        for _ in range(cycles):
            t = time.monotonic()
            snap = await manager.pause(capsule.id)
            pauses.append(time.monotonic() - t)
            idle = idle or snap
            t = time.monotonic()
            await manager.resume(capsule.id)
            resumes.append(time.monotonic() - t)
        assert idle is not None
        out["pause_s"] = round(statistics.median(pauses), 3)
        out["resume_s"] = round(statistics.median(resumes), 3)
        out["pause_max_s"] = round(max(pauses), 3)
        out["resume_max_s"] = round(max(resumes), 3)
        c = manager.get(capsule.id)
        out["pause_timings"] = c.extra.get("pause_timings")
        out["resume_timings"] = c.extra.get("resume_timings")
        out["snapshot_idle_bytes"] = idle.total_allocated
        out["snapshot_idle_ram_bytes"] = idle.ram_allocated

        await manager.exec(capsule.id, READ_200MB)
        snap = await manager.pause(capsule.id, prepare=False)
        out["snapshot_read_noprepare_bytes"] = snap.total_allocated
        await manager.resume(capsule.id)

        await manager.exec(capsule.id, "sync; echo 1 > /proc/sys/vm/drop_caches")
        await manager.exec(capsule.id, READ_200MB)
        snap = await manager.pause(capsule.id)
        out["snapshot_read_prepare_bytes"] = snap.total_allocated
        out["snapshot_read_prepare_pause_s"] = round(snap.pause_seconds, 3)
        await manager.destroy(capsule.id)
        await _templates_and_forks(manager, memory_mib, out)
    finally:
        for leftover in manager.list_capsules():
            await manager.destroy(leftover.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)

    out["resume_over_cold_boot"] = round(out["resume_s"] / out["cold_boot_s"], 3)
    out["create_warm_over_cold_boot"] = round(out["create_warm_s"] / out["cold_boot_s"], 3)
    out["read_prepare_over_idle"] = round(
        out["snapshot_read_prepare_bytes"] / out["snapshot_idle_bytes"], 3
    )
    out["read_prepare_over_noprepare"] = round(
        out["snapshot_read_prepare_bytes"] / out["snapshot_read_noprepare_bytes"], 3
    )
    out["create_from_template_over_warm"] = round(
        out["create_from_template_s"] / out["create_warm_s"], 3
    )
    out["targets"] = {
        "resume_s<=0.6": out["resume_s"] <= 0.6,
        "resume<=10%_cold_boot": out["resume_over_cold_boot"] <= 0.10,
        "pause_s<=3": out["pause_s"] <= 3.0,
        "read_prepare<=1.3x_idle": out["read_prepare_over_idle"] <= 1.3,
        "read_prepare<=0.5x_noprepare": out["read_prepare_over_noprepare"] <= 0.5,
        "create_warm_s<=1.0": out["create_warm_s"] <= 1.0,
        "create_warm<=15%_cold_boot": out["create_warm_over_cold_boot"] <= 0.15,
        "8_at_once_healthy_within_5s": out["create_8_at_once_healthy"] == 8
        and out["create_8_at_once_s"] <= 5.0,
        "template_from_capsule_s<=2.0": out["template_from_capsule_s"] <= 2.0,
        "source_stopped_ms<=1000": out["source_stopped_ms"] <= 1000,
        "create_from_template<=1.2x_warm": out["create_from_template_over_warm"] <= 1.2,
        "fork_s<=1.5": out["fork_s"] <= 1.5,
        "fork_8_s<=6_all_healthy": out["fork_8_s"] <= 6.0 and out["fork_8_healthy"] == 8,
        "disk_bytes_per_capsule_from_template<=16MiB": out["disk_bytes_per_capsule_from_template"]
        <= 16 << 20,
    }
    return out


# a process holding 100 MB of the guest's memory (the working set templates and forks copy)
HOLD_100MB = (
    "nohup python3 -c 'import os, time; held = os.urandom(100 << 20); time.sleep(1e9)' "
    ">/dev/null 2>&1 & sleep 4"
)


async def _templates_and_forks(
    manager: CapsuleManager, memory_mib: int, out: dict[str, Any]
) -> None:
    source = await manager.create(memory_mib=memory_mib)
    await manager.exec(source.id, HOLD_100MB)
    t = time.monotonic()
    template = await manager.template_create(source.id, "bench")
    out["template_from_capsule_s"] = round(time.monotonic() - t, 3)
    saved = SnapshotManifest.load(Path(template.path))
    assert saved is not None
    out["source_stopped_ms"] = round(saved.timings["vcpus_stopped"] * 1000)
    out["template_bytes"] = template.allocated

    made, times = [], []
    for _ in range(3):
        t = time.monotonic()
        made.append(await manager.create(template="bench"))
        times.append(time.monotonic() - t)
    out["create_from_template_s"] = round(statistics.median(times), 3)
    await asyncio.sleep(2)
    out["disk_bytes_per_capsule_from_template"] = max(
        manager.layout.disk(c.id).stat().st_blocks * 512 for c in made
    )
    for c in made:
        await manager.destroy(c.id)

    t = time.monotonic()
    [one] = await manager.fork(source.id)
    out["fork_s"] = round(time.monotonic() - t, 3)
    await manager.destroy(one.id)
    t = time.monotonic()
    eight = await manager.fork(source.id, count=8)
    out["fork_8_s"] = round(time.monotonic() - t, 3)
    out["fork_8_healthy"] = sum([(await manager.exec(c.id, "true")).exit_code == 0 for c in eight])
    for c in eight:
        await manager.destroy(c.id)
    await manager.destroy(source.id)
    await manager.template_remove("bench")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--memory", type=int, default=256)
    parser.add_argument("--cycles", type=int, default=3)
    args = parser.parse_args()
    result = asyncio.run(run(args.memory, args.cycles))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
