"""Copies of a capsule at one instant: saved as a template (`template_create`) or started as
new capsules (`fork`). Both capture the source with the one snapshot writer
(backend/capsules/snapshots.py) into a locked work dir; a running source is stopped only while
its RAM and disk are copied, a paused one is copied from its latest generation. Nothing becomes
visible until it is complete: a template is renamed into place after fsync, a fork's clones are
all started or all removed (and an agent killed meanwhile leaves work dirs and pending clones
that the next start-up removes: backend/capsules/reconcile.py)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backend import sparse
from backend.capsules import snapshots
from backend.capsules.actions import Action, require
from backend.capsules.disks import flatten
from backend.capsules.envd_client import EnvdError
from backend.capsules.errors import CapsuleError, SnapshotCorrupt
from backend.capsules.models import Capsule, State
from backend.capsules.pausing import latest_generation
from backend.capsules.ramdiff import StreamError
from backend.capsules.snapshots import CaptureSpec, DiskFrom, SnapshotManifest
from backend.capsules.templates import MAX_FORK, Template
from backend.runtime.base import VMMError

if TYPE_CHECKING:
    from backend.capsules.manager import CapsuleManager

COPY_ERRORS = (VMMError, EnvdError, SnapshotCorrupt, StreamError, OSError)


async def save_template(m: CapsuleManager, capsule_id: str, name: str, **record: Any) -> Template:
    """Save a running or paused capsule as template `name`. A running capsule is stopped
    only while its RAM and disk are copied; a paused one stays paused. `record`: more
    Template fields (a recipe layer's `hidden`, `env`, ...)."""
    m.templates.check_new_name(name)
    async with m.locks.hold(capsule_id):
        source = m.get(capsule_id)
        require(source, Action.TEMPLATE)
        try:
            template = await _write_template(m, source, name, record)
        except COPY_ERRORS as exc:
            raise CapsuleError(
                f"template {name!r} from {source.id} failed: {exc}; {source.id} is unchanged"
            ) from exc
        m.event(
            source.id,
            "template",
            f"saved as template {name} ({template.allocated / 2**20:.1f} MiB)",
        )
        if m.clones:
            m.prefetch_base(Path(template.path))
        return template


async def _write_template(
    m: CapsuleManager, source: Capsule, name: str, record: dict[str, Any]
) -> Template:
    with m.layout.work_dir("template") as work:
        # not durable: what is kept is written, checksummed and fsynced below (a clone's
        # capture, a diff as large as its working set, is rewritten by `materialize` anyway)
        captured = await _capture(m, source, work / "capture", prepare=True, durable=False)
        if captured.ram_base is not None:
            # a clone's capture is a diff on its base: a template stands on its own
            ram_base = await snapshots.open_base(
                m.bases, Path(captured.ram_base), captured.ram_base_sha256, f"{source.id}"
            )
            captured = await asyncio.to_thread(snapshots.materialize, captured, ram_base)
        out = work / name
        out.mkdir(mode=0o700)
        base = Path(source.image_dir) / "rootfs.ext4"
        for part in (snapshots.DISK, snapshots.RAM, snapshots.DEVICE_STATE):
            (captured.directory / part).rename(out / part)
        await flatten(out / snapshots.DISK, base)
        disk_allocated = sparse.allocated_bytes(out / snapshots.DISK)
        manifest = replace(
            captured,
            path=str(out),
            disk_allocated=disk_allocated,
            disk_sha256=await asyncio.to_thread(sparse.sparse_checksum, out / snapshots.DISK),
            # a running capsule's capture that materialize did not rewrite has none yet
            state_sha256=captured.state_sha256
            or await asyncio.to_thread(sparse.sha256_file, out / snapshots.DEVICE_STATE),
        )
        manifest.write()
        for part in (snapshots.DISK, snapshots.RAM, snapshots.DEVICE_STATE):
            (out / part).chmod(0o400)
            await asyncio.to_thread(sparse.fsync_file, out / part)
        template = m.templates.install(
            out,
            Template(
                name=name,
                builtin=False,
                source=source.id,
                created_at=time.time(),
                image_dir=source.image_dir,
                memory_mib=source.memory_mib,
                vcpus=source.vcpus,
                network=source.network,
                accel=source.accel,
                allocated=manifest.total_allocated,
                **record,
            ),
        )
    return template


async def _capture(
    m: CapsuleManager, source: Capsule, out: Path, *, prepare: bool, durable: bool = True
) -> SnapshotManifest:
    """The source's state at one instant, in `out` (uncommitted): captured from its VM,
    which keeps running, or copied from its latest generation if it is paused.

    `prepare`: drop the guest's page cache and inflate the balloon first (a template is kept
    for long: it is stored at its working set). A fork skips it: its clones' RAM came out the
    same size (206 vs 203 MiB with a 100 MB working set) and fork took 2.5 s instead of 3.0 s,
    8 clones 7.1 s instead of 10.7 s. Consistency does not depend on it: RAM and disk are
    copied with the vCPUs stopped and QEMU's block layer flushed.

    `durable=False` (a fork, a template): a running source's capture is neither fsynced nor
    checksummed (`snapshots.capture`); a paused source's copy keeps its generation's
    checksums."""
    if source.state == State.PAUSED:
        generation = latest_generation(m, source)
        out.mkdir(mode=0o700)
        what = f"generation {generation.directory.name} of {source.id}"
        for part, expected in (
            (snapshots.RAM, generation.ram_sha256),
            (snapshots.DISK, generation.disk_sha256),
        ):
            if part == snapshots.RAM and generation.is_diff:
                continue  # a clone's diff: its RAM is the base's plus the pages in vmstate
            copied = await asyncio.to_thread(
                sparse.sparse_copy, generation.directory / part, out / part, fsync=False
            )
            if copied.sha256 != expected:
                # a template would keep it for good: checked here, not only by a restore
                raise SnapshotCorrupt(f"{part} of {what} is corrupt (checksum mismatch)")
        shutil.copyfile(generation.directory / snapshots.DEVICE_STATE, out / snapshots.DEVICE_STATE)
        manifest = replace(generation, path=str(out))
        await asyncio.to_thread(snapshots.verify_state, manifest, what)
        manifest.write()
        return manifest
    vm = m.vm(source)
    if vm is None:
        raise CapsuleError(f"cannot capture {source.id}: its QEMU is not running")
    base = await m.running_base(source)
    m.save(source.with_(extra={**source.extra, "capturing": True}))
    try:
        async with m.envd(source, timeout=30) as envd:
            capture = await snapshots.capture(
                vm,
                envd,
                out,
                CaptureSpec.of(source),
                ram_file=m.layout.ram_file(source.id),
                disk=m.layout.disk(source.id),
                keep_running=True,
                prepare=prepare,
                base=base,
                # restored at once (fork) or turned into a full snapshot (template): packing
                # a diff kept for minutes would only cost the source's stopped time
                pack=False,
                durable=durable,
            )
    finally:
        current = m.store.get(source.id)
        if current is not None:
            extra = {k: v for k, v in current.extra.items() if k != "capturing"}
            m.save(current.with_(extra=extra))
    m.event(
        source.id,
        "capture",
        f"captured at one instant (vCPUs stopped {capture.stopped_s * 1000:.0f} ms)",
    )
    return capture.manifest


async def fork(m: CapsuleManager, capsule_id: str, count: int = 1) -> list[Capsule]:
    """`count` new capsules, each with the source's memory and disk at one instant; the
    source keeps running (or stays paused). All start, or none is left."""
    if not isinstance(count, int) or not 1 <= count <= MAX_FORK:
        raise CapsuleError(f"fork count must be 1..{MAX_FORK}, not {count!r}")
    async with m.locks.hold(capsule_id):
        source = m.get(capsule_id)
        require(source, Action.FORK)
        with m.layout.work_dir("fork") as work:
            captured = await _capture(m, source, work / "capture", prepare=False, durable=False)
            clones = []
            for _ in range(count):
                clone = m._new_capsule(
                    source.template,
                    Path(source.image_dir),
                    source.memory_mib,
                    source.vcpus,
                    source.network,
                    source.auto_pause_s,
                    source.accel,
                    fork_of=source.id,
                    init_token=source.access_token,
                )
                clones.append(clone)
            started = time.monotonic()
            results = await asyncio.gather(
                *(_start_clone(m, c, captured, source) for c in clones),
                return_exceptions=True,
            )
        failures = [r for r in results if isinstance(r, BaseException)]
        made = [r for r in results if isinstance(r, Capsule)]
        if failures:
            for clone in clones:
                with contextlib.suppress(CapsuleError):
                    await m.destroy(clone.id)
            first = failures[0]
            raise CapsuleError(
                f"fork of {source.id} failed ({len(failures)} of {count} clones): {first}"
            ) from (first if isinstance(first, Exception) else None)
        m.event(
            source.id,
            "fork",
            f"{count} clone(s) in {time.monotonic() - started:.2f} s: "
            + ", ".join(c.id for c in made),
        )
        return made


async def _start_clone(
    m: CapsuleManager, clone: Capsule, captured: SnapshotManifest, source: Capsule
) -> Capsule:
    async with m.locks.hold(clone.id):
        clone = await m._register(clone)
        m.event(clone.id, "create", f"fork of {source.id}")
        started = time.monotonic()
        clone, _ = await m._start_from(
            clone,
            captured,
            DiskFrom(),
            f"the capture of {source.id}",
            token=source.access_token,
            # checked once already: a paused source's generation as _capture copied it; a
            # running source's capture was written moments ago in this private work dir
            verify=False,
        )
        return m._running(clone, started, f"forked from {source.id}", "fork")
