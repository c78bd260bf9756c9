"""The one snapshot writer and the one snapshot reader: a VM's whole state in a directory.

A snapshot directory holds `mem` (guest RAM, sparse), `vmstate` (device state), `disk.qcow2`
(the disk at the same instant) and `snapshot.json` (sizes, extent checksums, what the VM was
taken with). Pause writes one as a capsule's next generation, `template create` as a template,
`fork` as the shared start of its clones, and the image builder as the built-in template.

Writing (`capture`):
  envd /snapshot/prepare (sync, drop the page cache, hold the reclaimer) -> balloon inflated
  to all but BALLOON_MARGIN of what the guest has available (QEMU punches those pages out of the
  RAM file at once; waiting for free-page reporting is the fallback) -> [release_balloon
  (built-in template): balloon deflated again, its pages stay holes] -> QMP `stop` -> device
  state (x-ignore-shared: RAM is the shared file) -> RAM copied sparsely -> disk linked (pause:
  the VM never runs again on it) or copied (the VM goes on) -> [keep_running: `cont`, balloon
  deflated, envd's hold released] -> checksums, manifest, fsync. The caller `commit`s it by
  renaming the directory into place, so a crash or a full disk never leaves a half snapshot
  visible; on any failure the directory is removed and a VM that was running runs again.
Reading (`restore`): checksums of the device state (and, while copying, of the disk and RAM)
  verified -> disk copied out of the snapshot or overlaid on a template's disk -> RAM file
  filled while the VMM starts -> device state loaded -> `cont` -> envd /health -> balloon
  deflated and /init (token, identity, clock, entropy) at once.
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
from backend.runtime.base import VM, Runtime, VMConfig, VMMError

log = logging.getLogger("wrenn.snapshots")

SNAPSHOT_FORMAT = 2
MANIFEST = "snapshot.json"
RAM = "mem"
DEVICE_STATE = "vmstate"
DISK = "disk.qcow2"

BALLOON_MARGIN = 24 << 20
"""Memory left to the guest while its balloon is inflated for a snapshot."""
BALLOON_MAX_WAIT_S = 3.0
BALLOON_STALL_S = 0.3
REPORTING_MIN_WAIT_S = 2.3
"""The guest reports freed pages only after a ~2 s delay; stopping earlier keeps them."""
REPORTING_SETTLE_S = 0.4
REPORTING_MAX_WAIT_S = 5.0
RELEASE_SETTLE_S = 2.5
"""After a template's balloon is deflated: the guest reports the pages it got back (its ~2 s
delay) while the template still runs, rather than in every clone after its restore."""


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

    @property
    def directory(self) -> Path:
        return Path(self.path)

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

    def write(self) -> None:
        data = asdict(self)
        data.pop("path")
        target = self.directory / MANIFEST
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class CaptureSpec:
    """What the VM being captured was started with (recorded in the manifest)."""

    memory_mib: int
    vcpus: int
    network: str
    accel: str
    envd_token: str | None


class Capture:
    """A capture written to its directory; the VM is left stopped unless kept running."""

    def __init__(
        self,
        manifest: SnapshotManifest,
        vm: VM,
        envd: Envd | None,
        memory_mib: int,
        inflated: bool,
        stopped_s: float,
    ) -> None:
        self.manifest = manifest
        self.stopped_s = stopped_s
        """How long the vCPUs were stopped (until `cont`, for a capture kept running)."""
        self._vm = vm
        self._envd = envd
        self._memory_mib = memory_mib
        self._inflated = inflated

    async def resume_guest(self) -> None:
        """Run the VM again after a capture that stopped it (its commit failed)."""
        await resume_guest(self._vm, self._envd, self._memory_mib, self._inflated, stopped=True)


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
    release_balloon: bool = False,
) -> Capture:
    """Write the VM's state into the new directory `out` (see the module docstring).

    `keep_running=False` (pause, the built-in template) leaves the VM stopped and its disk
    hard-linked: the caller commits, then quits the VM, or calls `resume_guest` if the commit
    fails. `keep_running=True` (template create, fork) copies the disk and runs the VM again
    as soon as RAM and disk are copied. `prepare=False` skips the guest's page-cache drop.

    `release_balloon` (the built-in template): once the balloon has emptied the RAM file,
    deflate it again before the VM stops. The guest gets its pages back as free pages that
    nothing wrote, so the file keeps its holes, and every VM restored from the snapshot starts
    with all its memory instead of deflating first: a clone of a shared template then copies
    2.9 MiB fewer pages (the guest's page bookkeeping for ~140 MiB of returned pages) and
    translates less (issue 21). Costs ~3 s (the deflate, then RELEASE_SETTLE_S), so pauses
    and user templates keep the balloon inflated (their restore deflates).
    """
    started = time.monotonic()
    timings: dict[str, float] = {}

    def mark(step: str) -> None:
        timings[step] = round(time.monotonic() - started, 3)

    out.mkdir(mode=0o700)
    inflated = stopped = False
    stopped_at = 0.0
    try:
        if prepare and envd is not None:
            try:
                prepared = await envd.snapshot_prepare()
            except EnvdError as exc:
                raise CapsuleError(f"envd could not prepare the snapshot: {exc}") from exc
            mark("prepare")
            inflated = await inflate_balloon(vm, spec.memory_mib, prepared)
            if not inflated:
                await wait_free_page_reporting(ram_file)
            elif release_balloon and await deflate_balloon(vm, spec.memory_mib):
                inflated = False
                await asyncio.sleep(RELEASE_SETTLE_S)
            mark("reclaim")
        async with vm.session():
            await vm.stop()
            stopped, stopped_at = True, time.monotonic()
            await vm.snapshot_create(out / DEVICE_STATE)
        mark("device_state")
        ram = await asyncio.to_thread(sparse.sparse_copy, ram_file, out / RAM, fsync=False)
        mark("ram_copy")
        if keep_running:
            copied = await asyncio.to_thread(sparse.sparse_copy, disk, out / DISK, fsync=False)
            disk_sha = copied.sha256
            await resume_guest(vm, envd, spec.memory_mib, inflated, stopped=True)
            stopped = False
            stopped_s = time.monotonic() - stopped_at
            mark("running_again")
            timings["vcpus_stopped"] = round(stopped_s, 3)
        else:
            disk_sha = await asyncio.to_thread(_link_or_copy, disk, out / DISK)
            stopped_s = time.monotonic() - stopped_at
            mark("disk")
        for name in (RAM, DEVICE_STATE, DISK):
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
            state_sha256=sparse.sha256_file(out / DEVICE_STATE),
            envd_token=spec.envd_token,
        )
        mark("durable")
        manifest = replace(manifest, timings=timings)
        manifest.write()
        sparse.fsync_dir(out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        if stopped or inflated or prepare:
            with contextlib.suppress(Exception):
                await resume_guest(vm, envd, spec.memory_mib, inflated, stopped=stopped)
        raise
    return Capture(manifest, vm, envd, spec.memory_mib, inflated and not keep_running, stopped_s)


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


async def inflate_balloon(vm: VM, memory_mib: int, prepared: dict[str, Any]) -> bool:
    """Take the guest's free memory with the balloon: QEMU punches those pages out of the RAM
    file at once, where free-page reporting would return them only after ~2 s.

    Leaves the guest BALLOON_MARGIN of headroom; deflate-on-oom gives pages back if it needs
    more. Returns False (the caller falls back to waiting for reporting) on any failure.
    """
    try:
        available = int(prepared["after"]["mem_available"])
    except (KeyError, TypeError, ValueError):
        return False
    take = available - BALLOON_MARGIN
    if take <= 0:
        return False
    target = (memory_mib << 20) - take
    try:
        async with vm.session():
            await vm.balloon_set(target)
            # QEMU's BALLOON_CHANGE event is throttled to one a second: poll instead
            deadline = time.monotonic() + BALLOON_MAX_WAIT_S
            last, last_change = await vm.balloon_actual(), time.monotonic()
            while time.monotonic() < deadline:
                await asyncio.sleep(0.03)
                actual = await vm.balloon_actual()
                if actual <= target + (1 << 20):
                    break
                if actual != last:
                    last, last_change = actual, time.monotonic()
                elif time.monotonic() - last_change > BALLOON_STALL_S:
                    break
    except VMMError:
        return False
    return True


async def deflate_balloon(vm: VM, memory_mib: int) -> bool:
    """Give the guest all its memory back and wait until it has it; False on any failure or
    if it has not got it all within BALLOON_MAX_WAIT_S (the caller then counts the balloon
    as still inflated)."""
    target = memory_mib << 20
    try:
        async with vm.session():
            await vm.balloon_set(target)
            deadline = time.monotonic() + BALLOON_MAX_WAIT_S
            while time.monotonic() < deadline:
                if await vm.balloon_actual() >= target:
                    return True
                await asyncio.sleep(0.03)
    except VMMError:
        return False
    return False


async def wait_free_page_reporting(ram_file: Path) -> None:
    """Wait until the guest has handed the freed page cache back (the RAM file shrinks)."""
    started = time.monotonic()
    last = sparse.allocated_bytes(ram_file)
    last_change = started
    while True:
        await asyncio.sleep(0.1)
        now = time.monotonic()
        current = sparse.allocated_bytes(ram_file)
        if current < last:
            last, last_change = current, now
        elapsed = now - started
        if elapsed >= REPORTING_MAX_WAIT_S:
            return
        if elapsed >= REPORTING_MIN_WAIT_S and now - last_change >= REPORTING_SETTLE_S:
            return


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
) -> tuple[VM, dict[str, float]]:
    """Start `config`'s VM from `snapshot`, running (envd not yet asked: see `bring_up`).

    The RAM file is created fresh (O_EXCL) in its private directory; `started` is called with
    the VM as soon as its process exists (the caller records the pid before anything else
    can fail). SnapshotCorrupt when a checksum does not match; nothing is left running then.
    """
    begin = time.monotonic()
    timings: dict[str, float] = {}
    await asyncio.to_thread(verify_state, snapshot, what)
    await place_disk(snapshot, config.disk, disk, what)
    timings["disk"] = round(time.monotonic() - begin, 3)
    size = (snapshot.directory / RAM).stat().st_size
    await asyncio.to_thread(sparse.create_holes, config.ram_file, size)
    vm = await runtime.restore(
        config, snapshot.directory / DEVICE_STATE, ready=fill_ram(snapshot, config.ram_file, what)
    )
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


async def bring_up(
    vm: VM,
    envd: Envd,
    memory_mib: int,
    body: dict[str, Any],
    deadline_s: float,
    *,
    balloon: bool = True,
) -> None:
    """After a restore: wait for envd, then give the guest its memory back (snapshots are
    taken with the balloon inflated) while envd takes its identity, clock and entropy."""
    await envd.wait_healthy(deadline_s, vm.alive)
    steps: list[Awaitable[Any]] = [envd.init(**body)]
    if balloon:
        steps.append(vm.balloon_set(memory_mib << 20))
    await asyncio.gather(*steps)
