"""The steps a capsule snapshot and a template snapshot share: shrinking the guest's RAM before
the save, and restoring a VM from a directory of snapshot files with verified checksums."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Protocol

from backend import sparse
from backend.capsules.errors import CapsuleError, SnapshotCorrupt
from backend.runtime.base import VMMError
from backend.runtime.qemu import QemuVM

BALLOON_MARGIN = 24 << 20
"""Memory left to the guest while its balloon is inflated for a snapshot."""
BALLOON_MAX_WAIT_S = 3.0
BALLOON_STALL_S = 0.3


class SnapshotFiles(Protocol):
    """A directory with `mem`, `vmstate` and `disk.qcow2`, and their checksums."""

    @property
    def path(self) -> str: ...
    @property
    def ram_sha256(self) -> str: ...
    @property
    def disk_sha256(self) -> str: ...
    @property
    def state_sha256(self) -> str: ...


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def inflate_balloon(vm: QemuVM, memory_mib: int, prepared: dict[str, Any]) -> bool:
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


async def copy_disk(files: SnapshotFiles, disk: Path, what: str) -> None:
    """Copy a snapshot's device state check and disk out, verifying checksums in the same pass;
    raises SnapshotCorrupt (removing the copy) on a mismatch."""
    source = Path(files.path)
    state_sha = await asyncio.to_thread(sha256_file, source / "vmstate")
    if state_sha != files.state_sha256:
        raise SnapshotCorrupt(f"device state of {what} is corrupt (checksum mismatch)")
    copied = await asyncio.to_thread(sparse.sparse_copy, source / "disk.qcow2", disk, fsync=False)
    if copied.sha256 != files.disk_sha256:
        disk.unlink(missing_ok=True)
        raise SnapshotCorrupt(f"disk of {what} is corrupt (checksum mismatch)")


def prepare_ram_file(files: SnapshotFiles, ram_file: Path) -> None:
    """Make the RAM file the VMM will map: full size, all holes, filled by `copy_ram`."""
    sparse.create_holes(ram_file, (Path(files.path) / "mem").stat().st_size)


async def copy_ram(files: SnapshotFiles, ram_file: Path, what: str) -> None:
    """Fill the prepared RAM file from the snapshot (the VMM may start meanwhile: it does not
    touch guest RAM before the device state is loaded); SnapshotCorrupt on a mismatch."""
    copied = await asyncio.to_thread(
        sparse.sparse_copy, Path(files.path) / "mem", ram_file, fsync=False, truncate=False
    )
    if copied.sha256 != files.ram_sha256:
        raise SnapshotCorrupt(f"RAM of {what} is corrupt (checksum mismatch)")


async def make_overlay(backing: Path, overlay: Path) -> None:
    """A private qcow2 overlay over a raw image (the capsule's or the template's disk)."""
    proc = await asyncio.create_subprocess_exec(
        "qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(backing),
        str(overlay), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise CapsuleError(f"qemu-img create failed: {err.decode(errors='replace').strip()}")
    overlay.chmod(0o600)
