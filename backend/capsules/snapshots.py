"""The one snapshot writer and the one snapshot reader: a VM's whole state in a directory.

A snapshot directory holds `mem` (guest RAM, sparse), `vmstate` (device state), `disk.qcow2`
(the disk at the same instant) and `snapshot.json` (sizes, extent checksums, what the VM was
taken with). Pause writes one as a capsule's next generation, `template create` as a template,
`fork` as the shared start of its clones, and the image builder as the built-in template.

Writing (`capture`):
  envd /snapshot/prepare (sync, drop the page cache, hold the reclaimer; the guest zeroes what
  it frees, `init_on_free=1`) -> QMP `stop` -> device state (x-ignore-shared: RAM is the
  shared file) -> RAM copied sparsely, its zero pages punched out -> disk linked (pause: the VM
  never runs again on it) or copied (the VM goes on) -> [keep_running: `cont`, envd's hold
  released] -> checksums, manifest, fsync. A clone's capture is a diff instead (`base`): one
  migration of all its RAM, filtered down to the pages that differ from its template. The
  caller `commit`s it by renaming the directory into place, so a crash or a full disk never
  leaves a half snapshot visible; on any failure the directory is removed and a VM that was
  running runs again.
Reading (`restore`): checksums of the device state (and, while copying, of the disk and RAM)
  verified -> disk copied out of the snapshot or overlaid on a template's disk -> RAM file
  filled while the VMM starts, or (a clone) the template's sealed RAM mapped privately ->
  device state loaded -> `cont` -> envd /health -> balloon set to full (a snapshot taken by an
  older version had it inflated) and /init (token, identity, clock, entropy) at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from backend import sparse
from backend.capsules.disks import make_overlay
from backend.capsules.envd_client import EnvdError
from backend.capsules.errors import CapsuleError, SnapshotCorrupt
from backend.capsules.guest import Envd
from backend.capsules.models import Capsule
from backend.capsules.ramdiff import (
    BaseChanged,
    RamBases,
    StreamError,
    TemplateRam,
    is_packed,
    save_diff,
    split_to_ram_file,
    unpack_stream,
)
from backend.runtime.base import VM, Runtime, VMConfig, VMMError

log = logging.getLogger("wrenn.snapshots")

SNAPSHOT_FORMAT = 2
MANIFEST = "snapshot.json"
RAM = "mem"
DEVICE_STATE = "vmstate"
DISK = "disk.qcow2"

RAM_BASE = "ram_base"
"""In a running clone's `extra`: the snapshot directory whose RAM it maps privately."""
RAM_BASE_SHA256 = "ram_base_sha256"
"""... and that RAM's checksum when the clone started."""


@dataclass(frozen=True)
class SnapshotManifest:
    """What `snapshot.json` says of its directory."""

    path: str
    """The directory (not stored: filled in when loaded)."""
    created_at: float
    memory_mib: int
    vcpus: int
    network: str
    accel: str
    ram_size: int
    ram_allocated: int
    ram_sha256: str
    disk_allocated: int
    disk_sha256: str
    state_size: int
    state_sha256: str
    envd_token: str | None = None
    """The access token envd holds in this state: a restore presents it to /init."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds from the start of the capture to the end of each step."""
    format: int = SNAPSHOT_FORMAT
    ram_base: str | None = None
    """A clone's snapshot: the directory of the snapshot whose `mem` its guest RAM was a
    private mapping of. There is no `mem` here; `vmstate` carries, with the device state, only
    the pages that differ from that base (backend/capsules/ramdiff.py)."""
    ram_base_sha256: str = ""
    """The base's `ram_sha256` when this was saved: a base that changed is never used."""

    @property
    def directory(self) -> Path:
        return Path(self.path)

    @property
    def is_diff(self) -> bool:
        return self.ram_base is not None

    @property
    def total_allocated(self) -> int:
        return self.ram_allocated + self.disk_allocated + self.state_size

    @classmethod
    def load(cls, directory: Path) -> SnapshotManifest | None:
        """The manifest of a complete snapshot directory; None when missing or unreadable."""
        try:
            raw = json.loads((directory / MANIFEST).read_text())
            known = {f.name for f in fields(cls)}
            manifest = cls(**{k: v for k, v in raw.items() if k in known}, path=str(directory))
        except (OSError, ValueError, TypeError):
            return None
        return manifest if manifest.format == SNAPSHOT_FORMAT else None

    def write(self, durable: bool = True) -> None:
        data = asdict(self)
        data.pop("path")
        target = self.directory / MANIFEST
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            if durable:
                os.fsync(f.fileno())


@dataclass(frozen=True)
class RamBase:
    """A clone's shared RAM: a (full) snapshot and the sealed copy of its `mem`."""

    snapshot: SnapshotManifest
    ram: TemplateRam

    @property
    def path(self) -> str:
        return self.snapshot.path


def with_base(extra: dict[str, Any], base: RamBase | None) -> dict[str, Any]:
    """A capsule's `extra` naming `base` as the RAM it maps (None: a RAM file of its own)."""
    out = {k: v for k, v in extra.items() if k not in (RAM_BASE, RAM_BASE_SHA256)}
    if base is not None:
        out[RAM_BASE] = base.path
        out[RAM_BASE_SHA256] = base.snapshot.ram_sha256
    return out


async def open_base(bases: RamBases, directory: Path, sha256: str | None, what: str) -> RamBase:
    """The base snapshot in `directory` with its RAM sealed in memory. `sha256`: the RAM
    checksum a diff or a running clone was made on (None: whatever the manifest says).
    SnapshotCorrupt when the base is gone, changed, or not a full snapshot."""
    base = SnapshotManifest.load(directory)
    if base is None or base.is_diff:
        raise SnapshotCorrupt(f"{what} was made on {directory}, which is gone")
    if sha256 is not None and base.ram_sha256 != sha256:
        raise SnapshotCorrupt(f"{what} was made on {directory}, which has changed since")
    try:
        ram = await bases.open(directory / RAM, base.ram_sha256)
    except BaseChanged as exc:
        raise SnapshotCorrupt(f"RAM of {directory} is unusable: {exc}") from exc
    return RamBase(base, ram)


@dataclass(frozen=True)
class CaptureSpec:
    """What the VM being captured was started with (recorded in the manifest)."""

    memory_mib: int
    vcpus: int
    network: str
    accel: str
    envd_token: str | None

    @classmethod
    def of(cls, capsule: Capsule) -> CaptureSpec:
        return cls(
            capsule.memory_mib, capsule.vcpus, capsule.network, capsule.accel, capsule.access_token
        )


class Capture:
    """A capture written to its directory; the VM is left stopped unless kept running."""

    def __init__(
        self,
        manifest: SnapshotManifest,
        vm: VM,
        envd: Envd | None,
        memory_mib: int,
        stopped_s: float,
    ) -> None:
        self.manifest = manifest
        self.stopped_s = stopped_s
        """How long the vCPUs were stopped (until `cont`, for a capture kept running)."""
        self._vm = vm
        self._envd = envd
        self._memory_mib = memory_mib

    async def resume_guest(self) -> None:
        """Run the VM again after a capture that stopped it (its commit failed)."""
        await resume_guest(self._vm, self._envd, self._memory_mib, False, stopped=True)


async def capture(
    vm: VM,
    envd: Envd | None,
    out: Path,
    spec: CaptureSpec,
    *,
    ram_file: Path,
    disk: Path,
    keep_running: bool,
    prepare: bool = True,
    base: RamBase | None = None,
    pack: bool = True,
    durable: bool = True,
) -> Capture:
    """Write the VM's state into the new directory `out` (see the module docstring).

    `keep_running=False` (pause, the built-in template) leaves the VM stopped and its disk
    hard-linked: the caller commits, then quits the VM, or calls `resume_guest` if the commit
    fails. `keep_running=True` (template create, fork) copies the disk and runs the VM again
    as soon as RAM and disk are copied. `prepare=False` skips the guest's page-cache drop.

    `base`: the VM is a clone of it (its RAM a private mapping of the base's sealed memfd):
    the snapshot is a diff, `vmstate` holding the device state and only the pages that differ
    from the base, and no `mem`; packed (ramdiff.filter_stream) unless `pack=False`. The
    balloon is left alone (QEMU 7.2 cannot give a clone's pages back: its discards fail on
    the sealed memfd).

    `durable=False` (a fork's capture, which this process restores at once from its private
    work dir and removes; a template's, which is rewritten and made durable where it is kept):
    nothing is fsynced and the device state gets no checksum
    (`state_sha256` is empty, so only `restore(verify=False)` takes it). For a fork of a
    capsule holding 100 MB this was ~0.07 s of fsync (with the vCPUs stopped) and ~0.08 s of
    SHA-256 here, plus the same again for every clone that verified it.

    Otherwise `mem` is the RAM file without its zero pages: the guest zeroes what it frees
    (`init_on_free=1`), so once its page cache is dropped its free memory is zero and the file
    holds the working set. The balloon is never inflated for a snapshot: the guest would zero
    every page it gets back on deflating, and a clone of the snapshot would hold each as a
    private copy.
    """
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(step: str) -> None:
        timings[step] = round(time.monotonic() - started, 3)

    out.mkdir(mode=0o700)
    stopped = False
    stopped_at = 0.0
    diff_pages = 0
    try:
        if prepare and envd is not None:
            try:
                await envd.snapshot_prepare()
            except EnvdError as exc:
                raise CapsuleError(f"envd could not prepare the snapshot: {exc}") from exc
            mark("prepare")
        if base is not None:
            stopped, stopped_at = True, time.monotonic()
            try:
                stats = await save_diff(vm, out / DEVICE_STATE, base.ram, pack=pack)
            except StreamError as exc:
                raise CapsuleError(f"saving the RAM diff failed: {exc}") from exc
            diff_pages = stats.pages - stats.pages_dropped
            mark("device_state")
            ram = sparse.CopyResult(size=spec.memory_mib << 20, allocated=0, sha256="")
        else:
            async with vm.session():
                await vm.stop()
                stopped, stopped_at = True, time.monotonic()
                await vm.snapshot_create(out / DEVICE_STATE)
            mark("device_state")
            ram = await asyncio.to_thread(sparse.sparse_copy, ram_file, out / RAM, fsync=False)
            mark("ram_copy")
            ram = await asyncio.to_thread(_without_zero_pages, out / RAM)
            mark("zero_pages")
        if keep_running:
            copied = await asyncio.to_thread(sparse.sparse_copy, disk, out / DISK, fsync=False)
            disk_sha = copied.sha256
            await resume_guest(vm, envd, spec.memory_mib, False, stopped=True)
            stopped = False
            stopped_s = time.monotonic() - stopped_at
            mark("running_again")
            timings["vcpus_stopped"] = round(stopped_s, 3)
        else:
            disk_sha = await asyncio.to_thread(_link_or_copy, disk, out / DISK)
            stopped_s = time.monotonic() - stopped_at
            mark("disk")
        if durable:
            # after `cont`: a capture kept running is not stopped while its files reach the disk
            for name in (RAM, DEVICE_STATE, DISK):
                if (out / name).exists():
                    await asyncio.to_thread(sparse.fsync_file, out / name)
        manifest = SnapshotManifest(
            path=str(out),
            created_at=time.time(),
            memory_mib=spec.memory_mib,
            vcpus=spec.vcpus,
            network=spec.network,
            accel=spec.accel,
            ram_size=ram.size,
            ram_allocated=ram.allocated,
            ram_sha256=ram.sha256,
            disk_allocated=sparse.allocated_bytes(out / DISK),
            disk_sha256=disk_sha,
            state_size=(out / DEVICE_STATE).stat().st_size,
            state_sha256=(
                await asyncio.to_thread(sparse.sha256_file, out / DEVICE_STATE) if durable else ""
            ),
            envd_token=spec.envd_token,
            ram_base=base.path if base is not None else None,
            ram_base_sha256=base.snapshot.ram_sha256 if base is not None else "",
        )
        mark("durable")
        if base is not None:
            timings["diff_pages"] = diff_pages
        manifest = replace(manifest, timings=timings)
        manifest.write(durable=durable)
        if durable:
            sparse.fsync_dir(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if stopped or prepare:
            with contextlib.suppress(Exception):
                await resume_guest(vm, envd, spec.memory_mib, False, stopped=stopped)
        raise
    return Capture(manifest, vm, envd, spec.memory_mib, stopped_s)


def _without_zero_pages(ram: Path) -> sparse.CopyResult:
    sparse.punch_zero_pages(ram)
    return sparse.CopyResult(
        size=ram.stat().st_size,
        allocated=sparse.allocated_bytes(ram),
        sha256=sparse.sparse_checksum(ram),
    )


def commit(tmp: Path, final: Path) -> SnapshotManifest:
    """Make a written capture visible under its final name, durably (rename + fsync of the
    parent). Raises FileExistsError if `final` exists: snapshots are never overwritten."""
    if final.exists():
        raise FileExistsError(errno.EEXIST, "snapshot exists", str(final))
    tmp.rename(final)
    sparse.fsync_dir(final.parent)
    manifest = SnapshotManifest.load(final)
    if manifest is None:
        raise CapsuleError(f"the snapshot committed to {final} cannot be read back")
    return manifest


def _link_or_copy(source: Path, target: Path) -> str:
    """Hard-link `source` (the VM will not write it again) or copy it across filesystems;
    returns its extent checksum."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        return sparse.sparse_copy(source, target, fsync=False).sha256
    return sparse.sparse_checksum(target)


async def resume_guest(
    vm: VM, envd: Envd | None, memory_mib: int, inflated: bool, *, stopped: bool
) -> None:
    """Undo what a capture did to a VM that goes on running: `cont`, the balloon deflated,
    envd's snapshot hold released. Each step is tried even if an earlier one fails."""
    if not vm.alive():
        return
    errors: list[Exception] = []
    if stopped:
        try:
            await vm.cont()
        except VMMError as exc:
            errors.append(exc)
    if inflated:
        try:
            await vm.balloon_set(memory_mib << 20)
        except VMMError as exc:
            errors.append(exc)
    if envd is not None:
        try:
            await envd.snapshot_abort()
        except EnvdError as exc:
            errors.append(exc)
    if errors:
        log.warning("resuming the guest after a capture: %s", "; ".join(map(str, errors)))


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiskFrom:
    """Where a restored VM's disk comes from: a copy of the snapshot's own disk (resume, fork,
    the built-in template), or a new overlay over a template's shared disk."""

    overlay_on: Path | None = None


def verify_state(snapshot: SnapshotManifest, what: str) -> None:
    state = sparse.sha256_file(snapshot.directory / DEVICE_STATE)
    if state != snapshot.state_sha256:
        raise SnapshotCorrupt(f"device state of {what} is corrupt (checksum mismatch)")


async def place_disk(snapshot: SnapshotManifest, target: Path, source: DiskFrom, what: str) -> None:
    if source.overlay_on is not None:
        await make_overlay(source.overlay_on, target)
        return
    copied = await asyncio.to_thread(
        sparse.sparse_copy, snapshot.directory / DISK, target, fsync=False
    )
    if copied.sha256 != snapshot.disk_sha256:
        target.unlink(missing_ok=True)
        raise SnapshotCorrupt(f"disk of {what} is corrupt (checksum mismatch)")


async def fill_ram(snapshot: SnapshotManifest, ram_file: Path, what: str) -> None:
    """Fill the (already created, all-holes) RAM file from the snapshot; the VMM may start
    meanwhile: it touches no guest memory before the device state is loaded."""
    copied = await asyncio.to_thread(
        sparse.sparse_copy, snapshot.directory / RAM, ram_file, fsync=False, truncate=False
    )
    if copied.sha256 != snapshot.ram_sha256:
        raise SnapshotCorrupt(f"RAM of {what} is corrupt (checksum mismatch)")


async def restore(
    runtime: Runtime,
    config: VMConfig,
    snapshot: SnapshotManifest,
    disk: DiskFrom,
    what: str,
    *,
    started: Callable[[VM], Awaitable[None] | None] | None = None,
    base: RamBase | None = None,
    verify: bool = True,
) -> tuple[VM, dict[str, float]]:
    """Start `config`'s VM from `snapshot`, running (envd not yet asked: see `bring_up`).

    Guest RAM is either a new private RAM file (created O_EXCL in its private directory and
    filled from the snapshot's `mem` while QEMU starts), or, with `base`, a private mapping of
    the base's sealed memfd: a clone, sharing every page it does not write (`snapshot` is then
    the base itself, or a diff on it). `started` is called with the VM as soon as its process
    exists (the caller records the pid before anything else can fail). SnapshotCorrupt when a
    checksum does not match; nothing is left running then. `verify=False`: the device state
    is not checked against its checksum (a fork's capture, which has none: `capture(durable=
    False)`).
    """
    begin = time.monotonic()
    timings: dict[str, float] = {}
    if snapshot.is_diff and (base is None or base.path != snapshot.ram_base):
        raise CapsuleError(f"{what} is a diff on {snapshot.ram_base}: restore it on that base")
    if verify:
        await asyncio.to_thread(verify_state, snapshot, what)
    await place_disk(snapshot, config.disk, disk, what)
    timings["disk"] = round(time.monotonic() - begin, 3)
    ready: Awaitable[None] | None = None
    state = snapshot.directory / DEVICE_STATE
    unpacked: Path | None = None
    if base is not None:
        config = replace(config, ram_private_base=base.ram.mem_path)
        if snapshot.is_diff and await asyncio.to_thread(is_packed, state):
            unpacked = config.run_dir / UNPACKED_STATE
            await asyncio.to_thread(_unpack_state, state, unpacked, base, what)
            state = unpacked
            timings["unpack"] = round(time.monotonic() - begin, 3)
    else:
        size = (snapshot.directory / RAM).stat().st_size
        await asyncio.to_thread(sparse.create_holes, config.ram_file, size)
        ready = fill_ram(snapshot, config.ram_file, what)
    try:
        vm = await runtime.restore(config, state, ready=ready)
    finally:
        if unpacked is not None:
            unpacked.unlink(missing_ok=True)
    timings["restore"] = round(time.monotonic() - begin, 3)
    if started is not None:
        try:
            pending = started(vm)
            if pending is not None:
                await pending
        except BaseException:
            vm.kill()
            await vm.wait_exit(5)
            raise
    return vm, timings


UNPACKED_STATE = "vmstate.unpacked"
"""In a capsule's run dir while it is restored from a packed diff: the stream QEMU loads."""


def _unpack_state(packed: Path, dest: Path, base: RamBase, what: str) -> None:
    """The migration stream the packed diff `packed` holds, written to `dest` (private; in
    the run dir, removed once QEMU has loaded it). Unpacked before QEMU starts, not fed to it
    through a pipe while it starts: a Python thread unpacking beside the event loop slowed the
    QEMU start and the load (resume +50..+200 ms against +25 ms this way, bench.packing)."""
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest.unlink(missing_ok=True)  # a leftover of a killed agent; never followed if a link
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(dest, flags, 0o600)
        with packed.open("rb") as src, os.fdopen(fd, "wb") as out:
            unpack_stream(src, out, base.ram)
    except StreamError as exc:
        dest.unlink(missing_ok=True)
        raise SnapshotCorrupt(f"{what}: {exc}") from exc
    except BaseException:
        dest.unlink(missing_ok=True)
        raise


def materialize(captured: SnapshotManifest, base: RamBase) -> SnapshotManifest:
    """Turn a diff (in its own, uncommitted directory) into a full snapshot in place: `mem`
    becomes the base's RAM with the diff's pages over it, `vmstate` the device state alone.
    For a template saved from a clone: it must outlive the base it came from. Not durable:
    the caller (copying._write_template) fsyncs every part and writes the manifest where the
    template is kept."""
    directory = captured.directory
    state = directory / DEVICE_STATE
    diff = state.with_name(DEVICE_STATE + ".diff")
    state.rename(diff)
    with diff.open("rb") as src:
        split_to_ram_file(src, state, directory / RAM, base.ram)
    diff.unlink()
    ram_sha = sparse.sparse_checksum(directory / RAM)
    return replace(
        captured,
        ram_allocated=sparse.allocated_bytes(directory / RAM),
        ram_sha256=ram_sha,
        state_size=state.stat().st_size,
        state_sha256=sparse.sha256_file(state),
        ram_base=None,
        ram_base_sha256="",
    )


async def bring_up(
    vm: VM,
    envd: Envd,
    memory_mib: int,
    body: dict[str, Any],
    deadline_s: float,
    *,
    balloon: bool = True,
) -> None:
    """After a restore: wait for envd, then set the balloon to the full size (a no-op but for
    a snapshot an older version took with it inflated) while envd takes its identity, clock
    and entropy."""
    await envd.wait_healthy(deadline_s, vm.alive)
    steps: list[Awaitable[Any]] = [envd.init(**body)]
    if balloon:
        steps.append(vm.balloon_set(memory_mib << 20))
    await asyncio.gather(*steps)
