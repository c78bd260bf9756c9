"""Pause and resume. Pause: the capsule's state is captured with the one snapshot writer
(snapshots.capture, VM left stopped) into `gen-N.tmp`, committed (fsync, rename), then QEMU
quits; from the rename on the capsule is paused whatever else fails (a state database error is
retried, then left to the next start-up to reconcile). Any failure before it runs the guest
again (vCPUs, balloon, envd's reclaimer) and keeps the previous generation. Resume: the latest
generation is restored (checksums verified) into a new VM with a new /init; a failure leaves
the capsule paused on the same generation, and a forward port taken meanwhile is replaced."""

from __future__ import annotations

import asyncio
import errno
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from backend import sparse
from backend.capsules import snapshots
from backend.capsules.actions import Action, require
from backend.capsules.errors import CapsuleError, SnapshotCorrupt
from backend.capsules.guest import BOOT_DEADLINE_S, init_body
from backend.capsules.models import Capsule, Snapshot, State
from backend.capsules.snapshots import (
    CaptureSpec,
    DiskFrom,
    SnapshotManifest,
)
from backend.runtime.base import VM
from backend.runtime.ports import free_port, port_is_free

if TYPE_CHECKING:
    from backend.capsules.manager import CapsuleManager


async def pause(m: CapsuleManager, capsule_id: str, prepare: bool = True) -> Snapshot:
    """Snapshot a running capsule to disk and stop its VM.

    `prepare=False` skips the guest's page-cache drop: the snapshot then holds the whole
    page cache (benchmarks use it to show what the preparation saves).
    """
    async with m.locks.hold(capsule_id):
        capsule = m.get(capsule_id)
        require(capsule, Action.PAUSE)
        vm = m.vm(capsule)
        if vm is None:
            raise CapsuleError(f"cannot pause {capsule_id}: its QEMU is not running")
        capsule = m.save(capsule.with_(state=State.PAUSING))
        started = time.monotonic()
        generation = capsule.generation + 1
        final = m.layout.generation(capsule.id, generation)
        try:
            manifest = await _capture_generation(m, capsule, vm, final, prepare)
        except BaseException as exc:
            reason = _pause_failure(m, capsule, exc)
            m.event(capsule_id, "error", reason)
            alive = vm.alive()
            m.save(
                capsule.with_(
                    state=State.RUNNING if alive else State.ERROR,
                    reason=reason,
                    pid=capsule.pid if alive else None,
                )
            )
            if isinstance(exc, Exception) and not isinstance(exc, CapsuleError):
                raise CapsuleError(reason) from exc
            raise
        # The generation is durable: from here the capsule is paused whatever else fails.
        m._vms.pop(capsule.id, None)
        try:
            await vm.quit()
        except Exception as exc:  # the snapshot is safe; a stuck QEMU is killed
            m.event(capsule.id, "warning", f"QEMU did not quit cleanly: {exc}")
            vm.kill()
        if manifest.is_diff:
            m.trim_bases_soon()
        return _paused(m, capsule, manifest, generation, time.monotonic() - started)


async def _capture_generation(
    m: CapsuleManager, capsule: Capsule, vm: VM, final: Path, prepare: bool
) -> SnapshotManifest:
    tmp = final.with_name(final.name + ".tmp")
    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    final.parent.chmod(0o700)
    shutil.rmtree(tmp, ignore_errors=True)
    async with m.envd(capsule, timeout=30) as envd:
        capture = await snapshots.capture(
            vm,
            envd,
            tmp,
            CaptureSpec.of(capsule),
            ram_file=m.layout.ram_file(capsule.id),
            disk=m.layout.disk(capsule.id),
            keep_running=False,
            prepare=prepare,
            base=await m.running_base(capsule),
        )
        try:
            return snapshots.commit(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            await capture.resume_guest()
            raise


def _pause_failure(m: CapsuleManager, capsule: Capsule, exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return (
            f"pause failed: no space left on the disk holding "
            f"{m.layout.snapshot_dir(capsule.id)}; the capsule keeps running and its "
            f"last snapshot (generation {capsule.generation}) is untouched. "
            "Free some space and pause again"
        )
    return f"pause failed: {exc}"


def _paused(
    m: CapsuleManager, capsule: Capsule, manifest: SnapshotManifest, generation: int, pause_s: float
) -> Snapshot:
    """Record a durable generation. If the state database fails here, the capsule is
    still recorded as paused on a second try; failing that, it stays `pausing` with the
    new generation on disk, which the next start reconciles to paused."""
    snapshot = Snapshot(
        capsule_id=capsule.id,
        generation=generation,
        path=manifest.path,
        created_at=manifest.created_at,
        ram_size=manifest.ram_size,
        ram_allocated=manifest.ram_allocated,
        ram_sha256=manifest.ram_sha256,
        disk_allocated=manifest.disk_allocated,
        disk_sha256=manifest.disk_sha256,
        state_size=manifest.state_size,
        state_sha256=manifest.state_sha256,
        pause_seconds=pause_s,
    )
    paused = capsule.with_(
        state=State.PAUSED,
        pid=None,
        generation=generation,
        reason="",
        extra={**capsule.extra, "pause_timings": {**manifest.timings, "quit": pause_s}},
    )
    last: Exception | None = None
    for _ in range(2):
        try:
            m.store.put_snapshot(snapshot)
            m.save(paused)
            last = None
            break
        except Exception as exc:
            last = exc
    if last is not None:
        raise CapsuleError(
            f"{capsule.id} was paused (generation {generation} is on disk) but the state "
            f"database could not record it: {last}. Restart wrenn-tui to reconcile"
        ) from last
    m.layout.cleanup_run_files(capsule.id)
    for old in m.store.snapshots(capsule.id):
        if old.generation < generation:
            m.store.delete_snapshot(capsule.id, old.generation)
    m.layout.remove_generations_except(capsule.id, generation)
    m.event(
        capsule.id,
        "paused",
        f"generation {generation}: {manifest.total_allocated / 2**20:.1f} MiB in {pause_s:.2f} s",
    )
    return snapshot


async def resume(m: CapsuleManager, capsule_id: str) -> Capsule:
    async with m.locks.hold(capsule_id):
        capsule = m.get(capsule_id)
        require(capsule, Action.RESUME)
        snapshot = latest_generation(m, capsule)
        capsule = _forward_port(m, capsule)
        started = time.monotonic()
        capsule = m.save(
            capsule.with_(
                state=State.RESUMING,
                extra={**capsule.extra, "init_token": snapshot.envd_token},
            )
        )
        try:
            capsule, timings = await m._start_from(
                capsule, snapshot, DiskFrom(), f"generation {snapshot.directory.name}"
            )
        except BaseException as exc:
            await m._kill(capsule)
            m.layout.cleanup_run_files(capsule.id)
            reason = f"resume failed: {exc}"
            if isinstance(exc, SnapshotCorrupt):
                reason += "; the capsule stays paused"
            m.event(capsule_id, "error", reason)
            m.save(capsule.with_(state=State.PAUSED, pid=None, reason=reason))
            if isinstance(exc, CapsuleError):
                raise CapsuleError(reason) from exc
            if isinstance(exc, Exception):
                raise CapsuleError(reason) from exc
            raise
        resume_s = time.monotonic() - started
        m.event(
            capsule_id,
            "running",
            f"resumed generation {capsule.generation} in {resume_s:.2f} s",
        )
        extra = {k: v for k, v in capsule.extra.items() if k != "init_token"}
        return m.save(
            capsule.with_(
                state=State.RUNNING,
                started_at=time.time(),
                reason="",
                last_activity=time.time(),
                extra={**extra, "resume_timings": timings, "resume_s": resume_s},
            )
        )


def latest_generation(m: CapsuleManager, capsule: Capsule) -> SnapshotManifest:
    """The paused capsule's latest snapshot generation (a clear error when it is gone)."""
    snapshot = SnapshotManifest.load(m.layout.generation(capsule.id, capsule.generation))
    if snapshot is None:
        raise CapsuleError(f"snapshot generation {capsule.generation} of {capsule.id} is missing")
    return snapshot


def _forward_port(m: CapsuleManager, capsule: Capsule) -> Capsule:
    """A new port for envd's forward when another program took it while the capsule was
    paused (an internet capsule's forward is on its own namespace's address)."""
    if capsule.network != "none" or port_is_free(capsule.host_port):
        return capsule
    old = capsule.host_port
    capsule = capsule.with_(host_port=free_port())
    m.event(capsule.id, "port", f"port {old} is taken; envd now on {capsule.host_port}")
    return capsule


async def resume_from_disk(m: CapsuleManager, capsule_id: str) -> Capsule:
    """Resume a paused capsule by booting its kernel on the disk of its latest snapshot,
    leaving the snapshot's memory unused (E2B's filesystem-only pause): its files are
    there, its processes are not. Any failure leaves it paused."""
    async with m.locks.hold(capsule_id):
        capsule = m.get(capsule_id)
        require(capsule, Action.RESUME)
        snapshot = latest_generation(m, capsule)
        capsule = _forward_port(m, capsule)
        started = time.monotonic()
        # a fresh boot: its RAM is a file of its own, not a clone's mapping of a base
        extra = snapshots.with_base(capsule.extra, None)
        capsule = m.save(capsule.with_(state=State.RESUMING, extra=extra))
        what = f"the disk of generation {snapshot.directory.name}"
        try:
            m.layout.run_dir(capsule.id).mkdir(parents=True, exist_ok=True, mode=0o700)
            m.layout.ensure_ram_dir()
            await m.networks.ensure(capsule)
            m._write_metadata(capsule)
            config = m.vm_config(capsule)
            await snapshots.place_disk(snapshot, config.disk, DiskFrom(), what)
            await asyncio.to_thread(sparse.create_holes, config.ram_file, capsule.memory_mib << 20)
            vm = await m.runtime(Path(capsule.image_dir)).create(config)
            capsule = m._started(capsule, vm)
            async with m.envd(capsule) as envd:
                await envd.wait_healthy(BOOT_DEADLINE_S, vm.alive)
                await envd.init(**init_body(capsule))
        except BaseException as exc:
            await m._kill(capsule)
            m.layout.cleanup_run_files(capsule.id)
            reason = f"resume from disk failed: {exc}; the capsule stays paused"
            m.event(capsule_id, "error", reason)
            m.save(capsule.with_(state=State.PAUSED, pid=None, reason=reason))
            if isinstance(exc, Exception):
                raise CapsuleError(reason) from exc
            raise
        resume_s = time.monotonic() - started
        m.event(capsule_id, "running", f"booted on {what} in {resume_s:.2f} s")
        return m.save(
            capsule.with_(
                state=State.RUNNING,
                started_at=time.time(),
                reason="",
                last_activity=time.time(),
            )
        )
