"""What capsules cost the host's disk, and what could be freed: the dashboard's host view.

Used (allocated bytes, so sparse files count what they really take): capsule disks and run
files, snapshot generations, saved templates, images (the built-in templates with their warm
snapshots), caches, and guest RAM files in the shared-memory dir.

Reclaimable, never anything a capsule or template needs:
- RAM files of capsules that have no VM (paused, failed, or unknown to the database and older
  than a minute, so a capsule being made by another process is left alone);
- `gen-*.tmp` snapshot directories of capsules not being paused (a crash's half-written
  generation; the last complete one is untouched);
- work directories no live process holds (their flock is free).
`free()` re-checks each one under the capsule's lock before it removes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backend.capsules.errors import CapsuleError
from backend.capsules.layout import GENERATION_PREFIX, TMP_SUFFIX, CapsuleLayout
from backend.capsules.locks import CapsuleLocks
from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths

UNKNOWN_GRACE_S = 60.0
"""A RAM file of a capsule the database does not know yet may belong to one being created."""
WITH_VM = frozenset({State.PENDING, State.RUNNING, State.PAUSING, State.RESUMING})
"""States in which a capsule's RAM file is (or is about to be) its VM's memory."""


def tree_allocated(path: Path) -> int:
    """Allocated bytes of a file or a tree, directories included (what `du` counts)."""
    total = 0
    if path.is_file():
        return path.stat().st_blocks * 512
    for root, _dirs, files in os.walk(path):
        with contextlib.suppress(OSError):
            total += os.lstat(root).st_blocks * 512
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
    return total


@dataclass(frozen=True)
class Reclaimable:
    path: Path
    kind: str
    """"ram" (an orphan RAM file), "tmp-snapshot" or "work"."""
    capsule_id: str | None
    size: int


@dataclass(frozen=True)
class DiskUsage:
    used: dict[str, int]
    """Line -> allocated bytes: capsule disks, snapshots, templates, images, caches, RAM files."""
    reclaimable: list[Reclaimable] = field(default_factory=list)
    free: int = 0
    """Bytes free on the state directory's filesystem."""
    shm_free: int = 0

    @property
    def reclaimable_bytes(self) -> int:
        return sum(item.size for item in self.reclaimable)


class UsageScanner:
    def __init__(self, paths: Paths, layout: CapsuleLayout, store: Store) -> None:
        self.paths = paths
        self.layout = layout
        self.store = store

    def states(self) -> dict[str, State]:
        """Every capsule's state, read on the store's own thread (SQLite)."""
        return {c.id: c.state for c in self.store.list_capsules()}

    def scan(self, states: Mapping[str, State]) -> DiskUsage:
        """Blocking (it walks the trees): may run in a thread, given `states()`."""
        used = {
            "capsule disks": tree_allocated(self.paths.capsules),
            "snapshot generations": tree_allocated(self.paths.snapshots),
            "templates": tree_allocated(self.layout.templates),
            "images": tree_allocated(self.paths.images),
            "caches": tree_allocated(self.paths.cache),
            "guest RAM files": tree_allocated(self.layout.ram_dir),
        }
        reclaimable = self._orphan_ram(states) + self._tmp_snapshots(states) + self._work()
        return DiskUsage(
            used=used,
            reclaimable=reclaimable,
            free=_free(self.paths.state),
            shm_free=_free(self.paths.shm),
        )

    def _orphan_ram(self, states: Mapping[str, State]) -> list[Reclaimable]:
        found: list[Reclaimable] = []
        if not self.layout.ram_dir.is_dir():
            return found
        for path in self.layout.ram_dir.glob("*.mem"):
            capsule_id = path.name.removesuffix(".mem")
            if _ram_orphaned(states.get(capsule_id), path):
                found.append(Reclaimable(path, "ram", capsule_id, tree_allocated(path)))
        return found

    def _tmp_snapshots(self, states: Mapping[str, State]) -> list[Reclaimable]:
        found: list[Reclaimable] = []
        if not self.paths.snapshots.is_dir():
            return found
        for path in self.paths.snapshots.glob(f"*/{GENERATION_PREFIX}*{TMP_SUFFIX}"):
            capsule_id = path.parent.name
            if _tmp_abandoned(states.get(capsule_id)):
                found.append(Reclaimable(path, "tmp-snapshot", capsule_id, tree_allocated(path)))
        return found

    def _work(self) -> list[Reclaimable]:
        found: list[Reclaimable] = []
        if not self.layout.work.is_dir():
            return found
        for path in self.layout.work.iterdir():
            if not _held(path):
                found.append(Reclaimable(path, "work", None, tree_allocated(path)))
        return found

    async def free(self, locks: CapsuleLocks) -> list[Reclaimable]:
        """Remove what `scan` finds reclaimable, each re-checked under its capsule's lock;
        returns what was removed."""
        removed: list[Reclaimable] = []
        for item in self.scan(self.states()).reclaimable:
            if item.capsule_id is None:
                if not _held(item.path):
                    shutil.rmtree(item.path, ignore_errors=True)
                    removed.append(item)
                continue
            if locks.busy(item.capsule_id):
                continue  # an operation of this process is on it: leave it to that
            known = self.store.get(item.capsule_id) is not None
            try:
                async with locks.hold(item.capsule_id, timeout=2.0):
                    state = self._state(item.capsule_id)
                    if item.kind == "ram" and _ram_orphaned(state, item.path):
                        with contextlib.suppress(FileNotFoundError):
                            item.path.unlink()
                        removed.append(item)
                    elif item.kind == "tmp-snapshot" and _tmp_abandoned(state):
                        shutil.rmtree(item.path, ignore_errors=True)
                        removed.append(item)
            except CapsuleError:
                continue  # busy in another process
            finally:
                if not known and self.store.get(item.capsule_id) is None:
                    locks.remove(item.capsule_id)
        return removed

    def _state(self, capsule_id: str) -> State | None:
        capsule = self.store.get(capsule_id)
        return None if capsule is None else capsule.state


def _ram_orphaned(state: State | None, path: Path) -> bool:
    if state is None:
        try:
            return time.time() - path.stat().st_mtime > UNKNOWN_GRACE_S
        except OSError:
            return False
    return state not in WITH_VM


def _tmp_abandoned(state: State | None) -> bool:
    return state != State.PAUSING


def _free(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _held(work_dir: Path) -> bool:
    """A live process holds the work dir's lock (or it is brand new and about to)."""
    try:
        fd = os.open(work_dir / ".lock", os.O_RDWR)
    except OSError:
        try:
            return time.time() - work_dir.stat().st_mtime < 10
        except OSError:
            return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
