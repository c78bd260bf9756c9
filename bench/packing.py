"""Packed RAM diffs against plain ones, in the same run on the same clone.

    python -m bench.packing [--cycles 8]

One clone of the default template; pause/resume cycles alternate between a packed diff (what a
pause writes) and a plain one (the filtered migration stream, as before packing), so the
machine's noise falls on both alike. Prints one JSON object: per way, the median pause and
resume seconds and bytes on disk (device state + diff + disk overlay).
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

from backend.capsules import snapshots
from backend.capsules.manager import CapsuleManager
from bench.lifecycle import scratch_paths


async def run(cycles: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="wb-", dir="/tmp"))
    manager = CapsuleManager(scratch_paths(root))
    await manager.start(watchdog=False)
    figures: dict[bool, dict[str, list[float]]] = {
        way: {"pause_s": [], "resume_s": [], "bytes": []} for way in (True, False)
    }
    defaults = snapshots.capture.__kwdefaults__
    assert defaults is not None
    try:
        capsule = await manager.create()
        await asyncio.sleep(2)
        for i in range(2 * cycles):
            pack = i % 2 == 0
            defaults["pack"] = pack
            started = time.monotonic()
            snap = await manager.pause(capsule.id)
            figures[pack]["pause_s"].append(time.monotonic() - started)
            figures[pack]["bytes"].append(snap.total_allocated)
            started = time.monotonic()
            await manager.resume(capsule.id)
            figures[pack]["resume_s"].append(time.monotonic() - started)
        if (await manager.exec(capsule.id, "true")).exit_code != 0:
            raise SystemExit("the clone is not healthy after the cycles")
    finally:
        defaults["pack"] = True
        for leftover in manager.list_capsules():
            await manager.destroy(leftover.id)
        await manager.close()
        shutil.rmtree(root, ignore_errors=True)
    out: dict[str, Any] = {"cycles": cycles}
    for pack, name in ((True, "packed"), (False, "plain")):
        out[name] = {
            key: round(statistics.median(values), 3) if key != "bytes" else int(min(values))
            for key, values in figures[pack].items()
        }
    for key in ("pause_s", "resume_s", "bytes"):
        out[f"{key}_packed_over_plain"] = round(out["packed"][key] / out["plain"][key], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=8)
    args = parser.parse_args()
    json.dump(asyncio.run(run(args.cycles)), sys.stdout)
    print()


if __name__ == "__main__":
    main()
