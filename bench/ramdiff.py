"""Issue 21 spike: clones sharing a sealed template memfd, and pauses that save only the pages
that differ from it, measured against today's private RAM files in the same run.

    python -m bench.ramdiff [--counts 1,4] [--idle 20]

Prints one JSON line. For each N and each way ("memfd": private mappings of the sealed
template; "today": a private sparse copy of the template's RAM in a share=on file, as warm
create does now): N clones restored from the default image's template snapshot, idle for
`--idle` s, then host memory per clone as the drop in MemAvailable (host caches dropped before
each reading; noisy on a shared machine) and as what the clones account for (each QEMU's
anonymous memory, plus the template memfd once or, today, every clone's RAM file). Then one
idle clone paused both ways: the filtered diff vs the full stream it came from vs today's
snapshot (RAM file allocation + device state), the filter's throughput, and the restore time
from the diff to envd healthy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from backend import sparse
from backend.capsules.disks import make_overlay
from backend.capsules.envd_client import EnvdClient
from backend.capsules.ramdiff import (
    FilterStats,
    TemplateRam,
    is_packed,
    save_diff,
    unpack_stream,
)
from backend.capsules.snapshots import DEVICE_STATE, DISK, RAM, SnapshotManifest
from backend.capsules.templates import snapshot_key
from backend.config import default_paths
from backend.runtime.base import VMConfig
from backend.runtime.ports import free_port
from backend.runtime.qemu import QemuRuntime, QemuVM
from bench.density import _mem_available, _smaps_rollup

MIB = 1 << 20
MEMORY_MIB = 256


def template_snapshot(image: Path, accel: str) -> SnapshotManifest:
    snap = SnapshotManifest.load(image / "snapshots" / snapshot_key(MEMORY_MIB, 1, accel))
    if snap is None:
        raise SystemExit(f"no template snapshot in {image}: run `wrenn-tui create` once first")
    return snap


@dataclass(frozen=True)
class TemplateFiles:
    """A template snapshot made here (build_hint_template): the SnapshotManifest fields the
    clones need."""

    directory: Path
    envd_token: str
    memory_mib: int = MEMORY_MIB
    vcpus: int = 1
    accel: str = "tcg"


Snap = SnapshotManifest | TemplateFiles


async def build_hint_template(runtime: QemuRuntime, image: Path, work: Path) -> TemplateFiles:
    """Cold-boot the image with free-page hinting on and save it the way a template snapshot
    is saved (page cache dropped, device state with x-ignore-shared, RAM file, disk). The
    built-in templates lack the hinting device, and a snapshot only restores into the same
    devices."""
    token = secrets.token_hex(12)
    snap = TemplateFiles(work / "template", token, accel=runtime.accel)
    snap.directory.mkdir(mode=0o700, parents=True)
    config = replace(
        clone_config(image, snap, work / "cold", None),
        free_page_hint=True,
        metadata_json=json.dumps({"instanceID": "cl-hint", "accessToken": token}),
    )
    await make_overlay(image / "rootfs.ext4", config.disk)
    sparse.create_holes(config.ram_file, MEMORY_MIB << 20)
    vm = await runtime.create(config)
    try:
        async with EnvdClient(f"http://127.0.0.1:{config.host_port}", token=token) as envd:
            await envd.wait_healthy(300, vm.alive)
            await asyncio.sleep(3)
            await envd.snapshot_prepare()
        await vm.stop()
        await vm.snapshot_create(snap.directory / DEVICE_STATE)
        sparse.sparse_copy(config.ram_file, snap.directory / RAM, fsync=False)
        shutil.copyfile(config.disk, snap.directory / DISK)
    finally:
        vm.kill()
        await vm.wait_exit(10)
        shutil.rmtree(work / "cold", ignore_errors=True)
    return snap


@dataclass
class Clone:
    vm: QemuVM
    config: VMConfig
    envd: EnvdClient

    async def sh(self, cmd: str, timeout: float = 60) -> str:
        result = await self.envd.exec(cmd, timeout=timeout)
        if result.exit_code != 0:
            raise AssertionError(f"{cmd!r} -> {result.exit_code}: {result.stderr}")
        return result.stdout

    async def stop(self) -> None:
        self.vm.kill()
        await self.vm.wait_exit(10)
        await self.envd.aclose()


def clone_config(image: Path, snap: Snap, work: Path, template: TemplateRam | None) -> VMConfig:
    """A clone's VM: RAM a private mapping of `template`, or (None) today's shared RAM file
    `work/mem`. Its disk is `work/disk.qcow2` (an overlay on the snapshot's disk)."""
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    return VMConfig(
        capsule_id=f"rd-{secrets.token_hex(3)}",
        run_dir=work / "run",
        kernel=image / "vmlinux",
        initrd=image / "initrd.cpio.gz",
        disk=work / "disk.qcow2",
        ram_file=work / "mem",
        memory_mib=snap.memory_mib,
        vcpus=snap.vcpus,
        host_port=free_port(),
        metadata_json=json.dumps({"instanceID": "cl-ramdiff", "accessToken": snap.envd_token}),
        accel=snap.accel,
        network="none",
        agent_disk=(image / "agent.ext4") if (image / "agent.ext4").is_file() else None,
        ram_private_base=template.mem_path if template is not None else None,
    )


async def start_clone(
    runtime: QemuRuntime,
    config: VMConfig,
    snap: Snap,
    state: Path | None = None,
) -> Clone:
    """Restore `config`'s VM from the template's device state (a new clone: disk overlay made,
    balloon deflated) or from a saved diff `state` (its disk is already there)."""
    if state is None:
        await make_overlay(snap.directory / DISK, config.disk)
        if config.ram_private_base is None:
            await asyncio.to_thread(
                sparse.sparse_copy, snap.directory / RAM, config.ram_file, fsync=False
            )
    if state is not None and config.ram_private_base is not None and is_packed(state):
        # a packed diff (what save_diff writes): unpacked on the clone's base first
        fd = os.open(config.ram_private_base, os.O_RDONLY | os.O_CLOEXEC)
        base = TemplateRam(fd, os.fstat(fd).st_size, "")
        unpacked = state.with_name(state.name + ".unpacked")
        try:
            with state.open("rb") as src, unpacked.open("wb") as out:
                unpack_stream(src, out, base)
        finally:
            base.close()
        state = unpacked
    vm = await runtime.restore(config, state or snap.directory / DEVICE_STATE)
    envd = EnvdClient(f"http://127.0.0.1:{config.host_port}", token=snap.envd_token)
    try:
        await envd.wait_healthy(120, vm.alive)
        if state is None:
            await vm.balloon_set(config.memory_mib << 20)
    except BaseException:
        vm.kill()
        await vm.wait_exit(10)
        await envd.aclose()
        raise
    return Clone(vm, config, envd)


def _accounted(clones: list[Clone], template: TemplateRam | None) -> int:
    """Host bytes the clones hold, whatever else runs on the machine: each QEMU's anonymous
    memory (its heap, TCG's translation cache, and a memfd clone's copied-on-write pages) plus
    the guest RAM held in files: the template memfd once, or (today) every clone's RAM file."""
    anon = sum(_smaps_rollup(c.vm.pid)["Anonymous"] for c in clones)
    if template is not None:
        return anon + template.allocated_bytes()
    return anon + sum(sparse.allocated_bytes(c.config.ram_file) for c in clones)


async def _density(
    runtime: QemuRuntime,
    image: Path,
    snap: SnapshotManifest,
    root: Path,
    template: TemplateRam | None,
    n: int,
    idle_s: float,
) -> dict[str, Any]:
    before = _mem_available()
    clones: list[Clone] = []
    try:
        for i in range(n):
            config = clone_config(image, snap, root / f"c{i}", template)
            clones.append(await start_clone(runtime, config, snap))
        await asyncio.sleep(idle_s)
        after = _mem_available()
        rolls = [_smaps_rollup(c.vm.pid) for c in clones]
        return {
            "host_mib_per_clone": round((before - after) / n / MIB, 1),
            "accounted_mib_per_clone": round(_accounted(clones, template) / n / MIB, 1),
            "qemu_anon_mib": round(statistics.mean(r["Anonymous"] for r in rolls) / MIB, 1),
            "qemu_pss_mib": round(statistics.mean(r["Pss"] for r in rolls) / MIB, 1),
            "qemu_rss_mib": round(statistics.mean(r["Rss"] for r in rolls) / MIB, 1),
        }
    finally:
        for c in clones:
            await c.stop()
        for i in range(n):
            shutil.rmtree(root / f"c{i}", ignore_errors=True)


async def _pause_sizes(
    runtime: QemuRuntime, image: Path, snap: SnapshotManifest, root: Path, template: TemplateRam
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # today's way: the RAM file (sparse) + the device state
    config = clone_config(image, snap, root / "today", None)
    clone = await start_clone(runtime, config, snap)
    try:
        await asyncio.sleep(20)
        await clone.vm.stop()
        state = root / "today" / "vmstate"
        await clone.vm.snapshot_create(state)
        out["today_snapshot_mib"] = round(
            (sparse.allocated_bytes(config.ram_file) + state.stat().st_size) / MIB, 1
        )
    finally:
        await clone.stop()
        shutil.rmtree(root / "today", ignore_errors=True)
    # the diff
    config = clone_config(image, snap, root / "diff", template)
    clone = await start_clone(runtime, config, snap)
    try:
        await asyncio.sleep(20)
        diff = root / "diff" / "diff.state"
        started = time.monotonic()
        stats: FilterStats = await save_diff(clone.vm, diff, template)
        out["pause_s"] = round(time.monotonic() - started, 3)
    finally:
        await clone.stop()
    out["full_stream_mib"] = round(stats.input_bytes / MIB, 1)
    out["diff_mib"] = round(stats.output_bytes / MIB, 2)
    out["pages_kept"] = stats.pages - stats.pages_dropped
    out["pages_dropped"] = stats.pages_dropped
    out["zero_records"] = stats.zero_records
    # filter throughput, apart from QEMU: the full stream once more from a file
    full = root / "diff" / "full.state"
    clone = await start_clone(runtime, config, snap, state=diff)
    try:
        out["first_exec_after_restore_s"] = round(await _timed_restore_check(clone), 3)
        await clone.vm.stop()
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        async with clone.vm.session():
            await clone.vm.set_migration_capabilities()
            try:
                await clone.vm.pass_fd(fd, "wrenn-migration")
            finally:
                os.close(fd)
            await clone.vm.migrate("migrate", {"uri": "fd:wrenn-migration"}, "full stream")
    finally:
        await clone.stop()
    from backend.capsules.ramdiff import filter_file

    started = time.monotonic()
    filter_file(full, root / "diff" / "again.state", template)
    elapsed = time.monotonic() - started
    out["filter_mb_per_s"] = round(full.stat().st_size / 1e6 / elapsed, 1)
    # restore time from the diff to envd healthy
    started = time.monotonic()
    clone = await start_clone(runtime, config, snap, state=root / "diff" / "again.state")
    out["restore_to_healthy_s"] = round(time.monotonic() - started, 3)
    await clone.stop()
    return out


async def _timed_restore_check(clone: Clone) -> float:
    started = time.monotonic()
    await clone.sh("true")
    return time.monotonic() - started


async def run(counts: list[int], idle_s: float) -> dict[str, Any]:
    paths = default_paths()
    image = paths.images / "default"
    snap = template_snapshot(image, "tcg")
    runtime = QemuRuntime(snap.accel)
    root = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    template = TemplateRam.from_file(snap.directory / RAM)
    out: dict[str, Any] = {"memory_mib": MEMORY_MIB, "accel": runtime.accel}
    try:
        if template.sha256 != snap.ram_sha256:
            raise SystemExit("the template's RAM file does not match its manifest")
        out["template_allocated_mib"] = round(template.allocated_bytes() / MIB, 1)
        sha = template.checksum()
        for n in counts:
            for way, base in (("memfd", template), ("today", None)):
                out[f"{way}_n{n}"] = await _density(runtime, image, snap, root, base, n, idle_s)
        out.update(await _pause_sizes(runtime, image, snap, root, template))
        # QEMU's save reads every guest page through its private mapping, and a read fault on
        # a hole of the memfd allocates a (shared) zero page in it: after the first pause of
        # any clone the template holds all of the guest's RAM size
        out["template_allocated_after_pause_mib"] = round(template.allocated_bytes() / MIB, 1)
        out["template_unchanged"] = template.checksum() == sha
    finally:
        template.close()
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,4")
    parser.add_argument("--idle", type=float, default=20.0)
    args = parser.parse_args()
    counts = [int(x) for x in args.counts.split(",")]
    with contextlib.suppress(KeyboardInterrupt):
        print(json.dumps(asyncio.run(run(counts, args.idle))))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
