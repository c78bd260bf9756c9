"""Issue 21: where one idle clone's QEMU memory goes, and what its first commands cost.

    python -m bench.qemucost [--idle 15] [--execs 4]

Restores one clone of the default image's template snapshot the way bench.ramdiff does (guest
RAM a private mapping of the sealed template memfd), brings it up as a warm create does
(`snapshots.bring_up`: envd /health, then /init and the balloon at once), leaves it idle for
`--idle` s and reads QEMU's anonymous memory per kind from /proc/PID/smaps; then runs `--execs`
commands (`true`) through envd, timing each, and reads it again. Prints one JSON line.

Kinds: `code` is TCG's translation buffer (the largest unnamed mapping of at least 32 MiB:
`tb-size`), `cow` the template's pages the guest has written (its copies in the memfd
mapping), `heap` QEMU's main heap, `rest` everything else (thread arenas, the TB hash table,
the softmmu TLBs, libraries' relocated data). Needs the template snapshot: run
`wrenn-tui capsule create` once first. Under KVM there is no `code`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from backend.capsules import snapshots
from backend.capsules.disks import make_overlay
from backend.capsules.envd_client import EnvdClient
from backend.capsules.ramdiff import TemplateRam
from backend.capsules.snapshots import DEVICE_STATE, DISK, RAM
from backend.config import default_paths
from backend.runtime.qemu import QemuRuntime
from bench.ramdiff import clone_config, template_snapshot

MIB = 1 << 20
CODE_MIN_BYTES = 32 * MIB


def memory_by_kind(pid: int) -> dict[str, float]:
    """QEMU's anonymous memory in MiB: total, code, cow, heap, rest (see the docstring)."""
    mappings: list[tuple[str, int, int]] = []  # name, size, anonymous bytes
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split(None, 5)
            if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
                start, end = (int(x, 16) for x in head[0].split("-"))
                name = head[5].strip() if len(head) > 5 else ""
                mappings.append((name, end - start, 0))
            elif head[0] == "Anonymous:" and mappings:
                name, size, _ = mappings[-1]
                mappings[-1] = (name, size, int(head[1]) * 1024)
    total = sum(anon for _, _, anon in mappings)
    unnamed = [anon for name, size, anon in mappings if not name and size >= CODE_MIN_BYTES]
    code = max(unnamed, default=0)
    cow = sum(anon for name, _, anon in mappings if name.startswith("/memfd:"))
    heap = sum(anon for name, _, anon in mappings if name == "[heap]")
    out = {"total": total, "code": code, "cow": cow, "heap": heap}
    out["rest"] = total - code - cow - heap
    return {k: round(v / MIB, 1) for k, v in out.items()}


async def run(idle_s: float, execs: int) -> dict[str, Any]:
    image = default_paths().images / "default"
    snap = template_snapshot(image, "tcg")
    runtime = QemuRuntime(snap.accel)
    root = Path(tempfile.mkdtemp(prefix="qc-", dir="/tmp"))
    template = TemplateRam.from_file(snap.directory / RAM)
    out: dict[str, Any] = {"memory_mib": snap.memory_mib, "accel": snap.accel}
    try:
        config = clone_config(image, snap, root / "clone", template)
        await make_overlay(snap.directory / DISK, config.disk)
        started = time.monotonic()
        vm = await runtime.restore(config, snap.directory / DEVICE_STATE)
        token = "qc-" + os.urandom(8).hex()
        envd = EnvdClient(f"http://127.0.0.1:{config.host_port}", token=snap.envd_token)
        try:
            body = {
                "accessToken": token,
                "timestamp": time.time(),
                "instanceID": config.capsule_id,
                "templateID": "default",
                "entropy": base64.b64encode(os.urandom(64)).decode(),
            }
            await snapshots.bring_up(vm, envd, config.memory_mib, body, 120)
            envd.token = token
            out["ready_s"] = round(time.monotonic() - started, 3)
            await asyncio.sleep(idle_s)
            out["idle"] = memory_by_kind(vm.pid)
            times = []
            for _ in range(execs):
                t = time.monotonic()
                result = await envd.exec("true")
                times.append(round(time.monotonic() - t, 3))
                if result.exit_code != 0:
                    raise SystemExit(f"`true` exited {result.exit_code}: {result.stderr}")
            out["exec_s"] = times
            out[f"after_{execs}_execs"] = memory_by_kind(vm.pid)
        finally:
            vm.kill()
            await vm.wait_exit(10)
            await envd.aclose()
    finally:
        template.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--idle", type=float, default=15.0)
    parser.add_argument("--execs", type=int, default=4)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(asyncio.run(run(args.idle, args.execs))))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
