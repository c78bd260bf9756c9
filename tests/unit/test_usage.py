"""Disk usage and cleanup on real files: the figures match what `du` says, and freeing space
removes orphans only, never what a running, pausing or paused capsule or a template needs."""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import pytest

from backend.capsules.layout import CapsuleLayout
from backend.capsules.locks import CapsuleLocks
from backend.capsules.models import Capsule, State
from backend.capsules.store import Store
from backend.capsules.usage import UsageScanner
from backend.config import Paths

MIB = 2**20


def du(path: Path) -> int:
    out = subprocess.run(
        ["du", "-s", "--block-size=1", str(path)], capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[0])


def write(path: Path, mib: int, sparse_tail_mib: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(os.urandom(mib * MIB))
        if sparse_tail_mib:
            f.truncate((mib + sparse_tail_mib) * MIB)  # a hole: size, not allocation
    return path


def capsule(store: Store, index: int, state: State, generation: int = 0) -> Capsule:
    c = Capsule(
        id=f"cl-usage{index:07d}",
        state=state,
        template="default",
        image_dir="/nonexistent",
        memory_mib=256,
        vcpus=1,
        created_at=time.time(),
        host_port=1,
        access_token="",
        generation=generation,
    )
    store.put(c)
    return c


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(
        data=tmp_path / "data",
        state=tmp_path / "state",
        cache=tmp_path / "cache",
        config=tmp_path / "config",
        shm=tmp_path / "shm",
    )
    p.ensure()
    p.shm.mkdir()
    return p


async def test_orphans_are_found_and_freed_and_nothing_needed_is_touched(paths: Paths) -> None:
    store = Store(paths.database)
    layout = CapsuleLayout(paths)
    layout.ensure()
    layout.ram_dir.mkdir(mode=0o700)
    running = capsule(store, 1, State.RUNNING)
    paused = capsule(store, 2, State.PAUSED, generation=1)
    pausing = capsule(store, 3, State.PAUSING, generation=1)
    needed = [
        write(layout.ram_file(running.id), 3, sparse_tail_mib=20),
        write(layout.disk(running.id), 2),
        write(layout.generation(paused.id, 1) / "mem", 2, sparse_tail_mib=50),
        write(layout.disk(paused.id), 1),
        write(layout.ram_file(pausing.id), 2),
        write(layout.generation(pausing.id, 1) / "mem", 1),
        write(layout.snapshot_dir(pausing.id) / "gen-000002.tmp" / "mem", 1),  # being written
        write(layout.template("web1") / "mem", 2),
        write(paths.images / "default@1" / "rootfs.ext4", 1),
        write(paths.cache / "debootstrap" / "base.tar", 1),
        write(layout.ram_dir / "cl-justcreated.mem", 1),  # unknown, but brand new
    ]
    orphan_ram = write(layout.ram_file(paused.id), 2)  # a crash left it beside the snapshot
    old_unknown = write(layout.ram_dir / "cl-gone0000000.mem", 1)
    past = time.time() - 3600
    os.utime(old_unknown, (past, past))
    half_snapshot = write(layout.snapshot_dir(paused.id) / "gen-000002.tmp" / "mem", 1)
    abandoned = layout.work / "template-dead"
    write(abandoned / "capture" / "mem", 1)
    (abandoned / ".lock").touch()
    held = layout.work / "fork-alive"
    write(held / "capture" / "mem", 1)
    lock_fd = os.open(held / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    needed.append(held / "capture" / "mem")
    contents = {path: path.read_bytes() for path in needed}
    try:
        scanner = UsageScanner(paths, layout, store)
        usage = scanner.scan(scanner.states())
        found = {(item.kind, item.path) for item in usage.reclaimable}
        assert found == {
            ("ram", orphan_ram),
            ("ram", old_unknown),
            ("tmp-snapshot", half_snapshot.parent),
            ("work", abandoned),
        }
        for item in usage.reclaimable:
            assert item.size == du(item.path)
        assert usage.used["guest RAM files"] == du(layout.ram_dir)
        assert usage.used["snapshot generations"] == du(paths.snapshots)
        assert usage.used["templates"] == du(layout.templates)
        assert usage.used["images"] == du(paths.images)
        assert usage.used["caches"] == du(paths.cache)
        assert usage.used["capsule disks"] == du(paths.capsules)
        # sparse RAM files count what they take, not their size
        assert usage.used["guest RAM files"] < 30 * MIB

        removed = await scanner.free(CapsuleLocks(paths.capsules))
        assert {item.path for item in removed} == {p for _, p in found}
        for path in (orphan_ram, old_unknown, half_snapshot.parent, abandoned):
            assert not path.exists()
        for path, data in contents.items():
            assert path.read_bytes() == data, f"{path} changed"
        assert scanner.scan(scanner.states()).reclaimable == []
    finally:
        os.close(lock_fd)
        store.close()


async def test_a_capsule_that_changed_state_since_the_scan_keeps_its_files(paths: Paths) -> None:
    """`free` looks again under the capsule's lock: a paused capsule resumed meanwhile keeps
    its RAM file."""
    store = Store(paths.database)
    layout = CapsuleLayout(paths)
    layout.ensure()
    layout.ram_dir.mkdir(mode=0o700)
    paused = capsule(store, 1, State.PAUSED, generation=1)
    ram = write(layout.ram_file(paused.id), 1)
    try:
        scanner = UsageScanner(paths, layout, store)
        assert [item.path for item in scanner.scan(scanner.states()).reclaimable] == [ram]
        real_scan = scanner.scan

        def scan_then_resume(states: dict[str, State]) -> object:
            result = real_scan(states)
            store.put(paused.with_(state=State.RUNNING))
            return result

        scanner.scan = scan_then_resume  # type: ignore[method-assign,assignment]
        assert await scanner.free(CapsuleLocks(paths.capsules)) == []
        assert ram.exists()
    finally:
        store.close()
