"""Capsules made from a template are clones of it (issue 21): their RAM is a private mapping of
the template's sealed RAM, and their pauses are diffs on it. Real VMs, through the manager."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import os
import time
from pathlib import Path

import pytest

from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.ramdiff import PACK_MAGIC, unpack_stream
from backend.capsules.snapshots import RAM_BASE, SnapshotManifest, open_base
from backend.capsules.templates import TemplateInUse
from backend.config import Paths
from tests.integration.conftest import destroy_all, sh

# 24 MB in guest RAM (tmpfs) and a file on the disk; the checksums say whether they survived
WRITE = (
    "head -c 24000000 /dev/urandom > /dev/shm/ram.bin && sync && "
    "echo disk-{tag} > /root/disk.txt && sha256sum /dev/shm/ram.bin | cut -c1-64"
)
READ = "sha256sum /dev/shm/ram.bin | cut -c1-64; cat /root/disk.txt"


def _base_mapping(pid: int) -> dict[str, int]:
    """The smaps entry of a clone's guest RAM: the private mapping of the base's memfd."""
    found: dict[str, int] = {}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            first = line.split(None, 1)[0]
            if "-" in first and ":" not in first:
                inside = "memfd:wrenn-base" in line
                continue
            if inside:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[-1] == "kB":
                    found[key] = found.get(key, 0) + int(parts[0]) * 1024
    return found


async def test_clones_share_their_template_and_diverge_on_write(manager: CapsuleManager) -> None:
    a = await manager.create()
    b = await manager.create()
    base = a.extra[RAM_BASE]
    assert b.extra[RAM_BASE] == base
    assert not manager.layout.ram_file(a.id).exists()  # no private copy of the RAM
    ram = (await open_base(manager.bases, Path(base), None, "the test")).ram
    sealed_sha = ram.checksum()
    written = (await sh(manager, a.id, WRITE.format(tag="a"))).strip()
    assert (await sh(manager, a.id, READ)).split() == [written, "disk-a"]
    # never seen in the other clone, nor in a clone made afterwards
    for other in (b, await manager.create()):
        out = await sh(manager, other.id, "cat /dev/shm/ram.bin /root/disk.txt 2>&1 || true")
        assert "No such file" in out and "disk-a" not in out
    # the template's RAM did not change, and nobody can change it
    assert ram.checksum() == sealed_sha
    with pytest.raises(PermissionError):
        fd = os.open(ram.mem_path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"x", 4096)
        finally:
            os.close(fd)
    # the clones really share: most of each one's guest RAM is the template's pages
    for clone in (a, b):
        assert clone.pid is not None
        mapping = _base_mapping(clone.pid)
        shared = mapping.get("Shared_Clean", 0) + mapping.get("Shared_Dirty", 0)
        assert shared > 16 << 20, mapping
    # A's private copies hold its 24 MB; B wrote nothing of the sort
    assert a.pid is not None and b.pid is not None
    assert _base_mapping(a.pid)["Anonymous"] > _base_mapping(b.pid)["Anonymous"] + (20 << 20)


async def test_a_clone_pauses_to_a_diff_and_loses_nothing_across_resumes_and_restarts(
    paths: Paths,
) -> None:
    manager = CapsuleManager(paths)
    await manager.start(watchdog=False)
    try:
        capsule = await manager.create()
        base = SnapshotManifest.load(Path(capsule.extra[RAM_BASE]))
        assert base is not None
        written = (await sh(manager, capsule.id, WRITE.format(tag="x"))).strip()
        for _ in range(2):
            snap = await manager.pause(capsule.id)
            manifest = SnapshotManifest.load(Path(snap.path))
            assert manifest is not None and manifest.ram_base == capsule.extra[RAM_BASE]
            assert not (Path(snap.path) / "mem").exists()
            # the diff holds the 24 MB written (random: packing cannot shrink it), not the
            # guest's 256 MiB
            assert 24_000_000 < manifest.state_size < 120 << 20, manifest.state_size
            assert (Path(snap.path) / "vmstate").read_bytes()[:8] == b"WRNDIFF1"
            # the save read every page, and reads of the template's holes allocated pages in
            # its memfd: once the clone's QEMU is gone they are given back
            deadline = time.monotonic() + 10
            while (manager.bases.allocated_for(base.directory / "mem") or 0) > (
                base.ram_allocated + (8 << 20)
            ):
                assert time.monotonic() < deadline, manager.bases.allocated_for(
                    base.directory / "mem"
                )
                await asyncio.sleep(0.2)
            await manager.resume(capsule.id)
            assert (await sh(manager, capsule.id, READ)).split() == [written, "disk-x"]
        await manager.pause(capsule.id)
    finally:
        await manager.close()
    # a new agent process: the base is opened again from disk (checksum verified)
    again = CapsuleManager(paths)
    await again.start(watchdog=False)
    try:
        resumed = await again.resume(capsule.id)
        assert resumed.extra[RAM_BASE] == capsule.extra[RAM_BASE]
        assert (await sh(again, capsule.id, READ)).split() == [written, "disk-x"]
        # a fork of a clone: clones of the same base, with the source's memory
        forks = await again.fork(capsule.id, 2)
        for fork in forks:
            assert fork.extra[RAM_BASE] == capsule.extra[RAM_BASE]
            assert (await sh(again, fork.id, READ)).split() == [written, "disk-x"]
        await sh(again, forks[0].id, "echo changed > /root/disk.txt; rm /dev/shm/ram.bin")
        assert (await sh(again, forks[1].id, READ)).split() == [written, "disk-x"]
        assert (await sh(again, capsule.id, READ)).split() == [written, "disk-x"]
    finally:
        await again.close()
        await destroy_all(paths)


async def test_a_template_from_a_clone_stands_alone_and_cannot_go_while_clones_use_it(
    manager: CapsuleManager,
) -> None:
    source = await manager.create()
    written = (await sh(manager, source.id, WRITE.format(tag="t"))).strip()
    template = await manager.template_create(source.id, "clone-tpl")
    saved = SnapshotManifest.load(Path(template.path))
    assert saved is not None and saved.ram_base is None  # its own RAM file
    assert (Path(template.path) / "mem").is_file()
    await manager.destroy(source.id)
    made = await manager.create(template="clone-tpl")
    assert made.extra[RAM_BASE] == template.path
    assert (await sh(manager, made.id, READ)).split() == [written, "disk-t"]
    await manager.pause(made.id)
    # a paused clone's generation is a packed diff: a fork of it and a template of it unpack it
    (forked,) = await manager.fork(made.id, 1)
    assert forked.extra[RAM_BASE] == template.path
    assert (await sh(manager, forked.id, READ)).split() == [written, "disk-t"]
    await manager.destroy(forked.id)
    again = await manager.template_create(made.id, "paused-tpl")
    assert (Path(again.path) / "mem").is_file()
    from_paused = await manager.create(template="paused-tpl")
    assert (await sh(manager, from_paused.id, READ)).split() == [written, "disk-t"]
    await manager.destroy(from_paused.id)
    await manager.template_remove("paused-tpl")
    assert manager.get(made.id).state == State.PAUSED
    # its paused diff needs the template: it cannot be removed, and it still works after
    with pytest.raises(TemplateInUse):
        await manager.template_remove("clone-tpl")
    await manager.resume(made.id)
    assert (await sh(manager, made.id, READ)).split() == [written, "disk-t"]
    await manager.destroy(made.id)
    await manager.template_remove("clone-tpl")


async def test_a_changed_base_is_refused_and_the_paused_clone_loses_nothing(
    paths: Paths,
) -> None:
    manager = CapsuleManager(paths)
    await manager.start(watchdog=False)
    capsule = await manager.create()
    try:
        written = (await sh(manager, capsule.id, WRITE.format(tag="c"))).strip()
        await manager.pause(capsule.id)
    finally:
        await manager.close()
    base_mem = Path(capsule.extra[RAM_BASE]) / "mem"
    # find a data page of the base and flip one byte of it
    with base_mem.open("r+b") as f:
        offset = os.lseek(f.fileno(), 0, os.SEEK_DATA)
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
    other = CapsuleManager(paths)
    await other.start(watchdog=False)
    try:
        with pytest.raises(CapsuleError, match="changed"):
            await other.resume(capsule.id)
        assert other.get(capsule.id).state == State.PAUSED
        # put the byte back: the diff was never touched, the capsule resumes whole
        with base_mem.open("r+b") as f:
            f.seek(offset)
            f.write(byte)
        await other.resume(capsule.id)
        assert (await sh(other, capsule.id, READ)).split() == [written, "disk-c"]
    finally:
        await other.close()
        await destroy_all(paths)


async def test_a_diff_that_unpacks_wrong_fails_fast_and_an_unpacked_one_still_resumes(
    manager: CapsuleManager,
) -> None:
    capsule = await manager.create()
    written = (await sh(manager, capsule.id, WRITE.format(tag="d"))).strip()
    snap = await manager.pause(capsule.id)
    generation = Path(snap.path)
    state = generation / "vmstate"
    packed = state.read_bytes()
    assert packed.startswith(PACK_MAGIC)

    def store(data: bytes) -> None:
        # past the checksum: what a bug, or a disk that lies, would leave
        manifest = SnapshotManifest.load(generation)
        assert manifest is not None
        state.write_bytes(data)
        sha = hashlib.sha256(data).hexdigest()
        dataclasses.replace(manifest, state_sha256=sha, state_size=len(data)).write()

    # a frame QEMU would never see a byte of: QEMU waits for data that never comes, and the
    # resume must not wait out the load's timeout
    store(packed[: len(PACK_MAGIC)] + b"Q" + packed[len(PACK_MAGIC) + 1 :])
    started = time.monotonic()
    with pytest.raises(CapsuleError, match="packed RAM diff corrupt"):
        await manager.resume(capsule.id)
    assert time.monotonic() - started < 20
    assert manager.get(capsule.id).state == State.PAUSED
    # a generation paused before diffs were packed holds the stream QEMU loads as it is
    base = await open_base(manager.bases, Path(capsule.extra[RAM_BASE]), None, "the test")
    unpacked = io.BytesIO()
    unpack_stream(io.BytesIO(packed), unpacked, base.ram)
    assert unpacked.getvalue().startswith(b"QEVM")
    store(unpacked.getvalue())
    await manager.resume(capsule.id)
    assert (await sh(manager, capsule.id, READ)).split() == [written, "disk-d"]
    # and its next pause is packed again
    again = await manager.pause(capsule.id)
    assert (Path(again.path) / "vmstate").read_bytes().startswith(PACK_MAGIC)
    await manager.resume(capsule.id)
    assert (await sh(manager, capsule.id, READ)).split() == [written, "disk-d"]
