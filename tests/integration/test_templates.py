"""Warm templates: capsules are restored from a snapshot of the booted template."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from backend import sparse
from backend.capsules.disks import make_overlay
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.snapshots import DEVICE_STATE, DISK, RAM, SnapshotManifest
from backend.capsules.templates import snapshot_key
from backend.config import Paths
from backend.runtime.qemu import QemuRuntime
from bench.ramdiff import clone_config
from tests.integration.conftest import sh

pytestmark = pytest.mark.vm


async def test_clones_of_one_template_have_their_own_identity(manager: CapsuleManager) -> None:
    a = await manager.create()
    b = await manager.create()
    assert a.extra["start"] == b.extra["start"] == "warm"
    assert a.id != b.id and a.access_token != b.access_token
    probe = (
        "cat /run/wrenn/.WRENN_SANDBOX_ID; echo; "
        "for i in 1 2 3; do cat /proc/sys/kernel/random/uuid; done; "
        "python3 -c 'import os; print(os.urandom(16).hex())'"
    )
    out_a, out_b = await asyncio.gather(sh(manager, a.id, probe), sh(manager, b.id, probe))
    lines_a, lines_b = out_a.split(), out_b.split()
    assert lines_a[0] == a.id and lines_b[0] == b.id
    assert not set(lines_a[1:]) & set(lines_b[1:]), "two clones produced the same random values"
    # each answers only its own token
    import httpx

    async with httpx.AsyncClient() as client:
        wrong = await client.get(
            f"{a.envd_url}/metrics", headers={"X-Access-Token": b.access_token}
        )
        assert wrong.status_code == 401
    # the guest clock was set from the host's
    guest_now = float((await sh(manager, a.id, "date +%s.%N")).strip())
    import time

    assert abs(guest_now - time.time()) < 5


async def test_warm_capsule_runs_pauses_and_resumes(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    await sh(manager, capsule.id, "echo warm > /root/w")
    await manager.pause(capsule.id)
    await manager.resume(capsule.id)
    assert (await sh(manager, capsule.id, "cat /root/w")).strip() == "warm"


def _private_image_copy(paths: Paths, root: Path) -> Paths:
    """A data dir whose default image shares the real one's big read-only files but has its own
    copy of the template snapshots, so a test can damage them."""
    real = (paths.data / "images" / "default").resolve()
    data = root / "data"
    copy = data / "images" / real.name
    copy.mkdir(parents=True)
    for name in ("vmlinux", "initrd.cpio.gz", "rootfs.ext4", "agent.ext4"):
        os.link(real / name, copy / name)
    shutil.copy2(real / "manifest.json", copy / "manifest.json")
    shutil.copytree(
        real / "snapshots", copy / "snapshots", ignore=shutil.ignore_patterns(".lock", ".*tmp*")
    )
    (data / "images" / "default").symlink_to(real.name)
    return Paths(
        data=data, state=paths.state, cache=paths.cache, config=paths.config, shm=paths.shm
    )


async def test_tampered_template_snapshot_falls_back_to_cold_boot(
    manager: CapsuleManager, paths: Paths, short_tmp: Path
) -> None:
    # make sure the template snapshot exists (built on first use)
    first = await manager.create()
    await manager.destroy(first.id)
    private = _private_image_copy(paths, short_tmp)
    image = (private.data / "images" / "default").resolve()
    key = snapshot_key(256, 1, first.accel)
    mem = image / "snapshots" / key / "mem"
    with mem.open("r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    other = CapsuleManager(private)
    await other.start(watchdog=False)
    try:
        capsule = await other.create()
        assert capsule.state == State.RUNNING
        assert capsule.extra["start"] == "cold"
        events = [e for e in other.events(capsule.id) if e.kind == "cold-boot"]
        assert events and "checksum" in events[0].message
        assert (await sh(other, capsule.id, "echo ok")).strip() == "ok"
        # the damaged snapshot was discarded, not left to fail again
        assert not (image / "snapshots" / key).exists()
        await other.destroy(capsule.id)
    finally:
        await other.close()


async def test_template_snapshot_keeps_its_holes_and_restores_with_all_its_memory(
    manager: CapsuleManager, paths: Paths, short_tmp: Path
) -> None:
    """The template is saved with the balloon deflated and without its zero pages (the guest
    zeroes what it frees): the file holds the working set, and a VM restored from it has all
    its memory before any deflate (a clone deflating would copy every page; issue 21)."""
    first = await manager.create()
    await manager.destroy(first.id)
    image = (paths.data / "images" / "default").resolve()
    snap = SnapshotManifest.load(image / "snapshots" / snapshot_key(256, 1, first.accel))
    assert snap is not None
    memory = snap.memory_mib << 20
    assert snap.ram_allocated < memory * 0.6, "the template's RAM file lost its holes"
    config = clone_config(image, snap, short_tmp, None)  # a RAM file of its own
    await make_overlay(snap.directory / DISK, config.disk)
    await asyncio.to_thread(sparse.sparse_copy, snap.directory / RAM, config.ram_file, fsync=False)
    vm = await QemuRuntime(snap.accel).restore(config, snap.directory / DEVICE_STATE)
    try:
        # nothing has asked for a deflate: this is the state the snapshot was saved in
        assert await vm.balloon_actual() == memory
    finally:
        vm.kill()
        await vm.wait_exit(10)
