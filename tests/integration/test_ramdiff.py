"""Issue 21 spike on real VMs: clones whose RAM is a private mapping of the template's sealed
memfd, paused through the RAM diff filter and restored from it (backend/capsules/ramdiff.py).

At most two VMs run at once."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from backend.capsules.manager import CapsuleManager
from backend.capsules.ramdiff import StreamError, TemplateRam, save_diff, split_to_ram_file
from backend.capsules.snapshots import RAM, SnapshotManifest
from backend.runtime.qemu import QemuRuntime, qemu_user
from bench.ramdiff import Clone, clone_config, start_clone
from tests.integration.conftest import manager

__all__ = ["manager"]

pytestmark = pytest.mark.vm

MEMORY_MIB = 256
DATA = "head -c 16M /dev/urandom > /root/data && sync && sha256sum /root/data"
# files from the template's page cache: a clone reads them from pages shared with the template
BURST = "b = bytearray(100 << 20); b[::4096] = b'x' * (len(b) // 4096)"
SHARED_READ = "cat /proc/meminfo >/dev/null; sha256sum /usr/bin/* 2>/dev/null | sha256sum"


@pytest.fixture
async def template(manager: CapsuleManager) -> AsyncIterator[tuple[SnapshotManifest, TemplateRam]]:
    image = manager.paths.image_dir("default")
    runtime = manager.runtime(image)
    snap = await manager.warm.ensure(image, MEMORY_MIB, 1, runtime.accel)
    ram = TemplateRam.from_file(snap.directory / RAM)
    assert ram.sha256 == snap.ram_sha256
    try:
        yield snap, ram
    finally:
        ram.close()


def _runtime(manager: CapsuleManager) -> QemuRuntime:
    runtime = manager.runtime(manager.paths.image_dir("default"))
    assert isinstance(runtime, QemuRuntime)
    return runtime


async def test_a_clone_pauses_to_a_diff_and_resumes_twice_losing_nothing(
    manager: CapsuleManager,
    template: tuple[SnapshotManifest, TemplateRam],
    short_tmp: Path,
) -> None:
    snap, ram = template
    before = ram.checksum()
    runtime = _runtime(manager)
    image = manager.paths.image_dir("default")
    config = clone_config(image, snap, short_tmp / "clone", ram)
    fresh: TemplateRam | None = None
    clone = await start_clone(runtime, config, snap)
    try:
        # QEMU opened the memfd as root, then dropped to its own user (-runas)
        if qemu_user() is not None:
            uid = Path(f"/proc/{clone.vm.pid}/status").read_text().split("Uid:")[1].split()[0]
            assert int(uid) == qemu_user().pw_uid  # type: ignore[union-attr]
        await clone.sh("echo first > /root/marker && sync")
        want = (await clone.sh(DATA)).split()[0]
        for generation in (1, 2):
            diff = short_tmp / f"diff{generation}"
            stats = await save_diff(clone.vm, diff, ram)
            assert diff.stat().st_size == stats.output_bytes
            # most of the guest's pages are the template's: they are not in the diff
            assert stats.pages_dropped > 10_000, stats
            assert stats.output_bytes < stats.input_bytes / 2, stats
            await clone.stop()
            if generation == 2:
                # as after an agent restart: the diff restores on a new memfd, same content
                fresh = TemplateRam.from_file(snap.directory / RAM)
                config = replace(config, ram_private_base=fresh.mem_path)
            clone = await start_clone(runtime, config, snap, state=diff)
            assert (await clone.sh("cat /root/marker")).split() == (
                ["first"] if generation == 1 else ["first", "second"]
            )
            assert (await clone.sh("sha256sum /root/data")).split()[0] == want
            await clone.sh("echo second >> /root/marker && sync")
        assert ram.checksum() == before
    finally:
        await clone.stop()
        if fresh is not None:
            assert fresh.checksum() == before
            fresh.close()
        shutil.rmtree(short_tmp / "clone", ignore_errors=True)


async def test_discards_in_one_clone_change_neither_the_template_nor_another_clone(
    manager: CapsuleManager,
    template: tuple[SnapshotManifest, TemplateRam],
    short_tmp: Path,
) -> None:
    """QEMU 7.2 discards a clone's freed pages (free-page reporting, balloon) by punching holes
    in the backing file: on the sealed memfd the punch fails, so the other clones and the
    template keep their pages."""
    snap, ram = template
    before = ram.checksum()
    runtime = _runtime(manager)
    image = manager.paths.image_dir("default")
    clones: list[Clone] = []
    try:
        for name in ("a", "b"):
            clones.append(
                await start_clone(runtime, clone_config(image, snap, short_tmp / name, ram), snap)
            )
        a, b = clones
        b_read = await b.sh(SHARED_READ)
        await a.sh("echo only-in-a > /dev/shm/mark")
        # a burst of memory in A, freed: free-page reporting hands it back to QEMU
        await a.sh(f'python3 -c "{BURST}"')
        await asyncio.sleep(6)
        # and a balloon inflation: QEMU discards every page the guest gives it
        await a.vm.balloon_set(128 << 20)
        for _ in range(120):
            if await a.vm.balloon_actual() <= 128 << 20:
                break
            await asyncio.sleep(0.5)
        assert await a.vm.balloon_actual() <= 128 << 20
        await a.vm.balloon_set(MEMORY_MIB << 20)
        log = a.config.vmm_log.read_text()
        assert "Failed to fallocate mem0" in log, log[-2000:]  # the punches were tried, and refused
        assert ram.checksum() == before
        assert await b.sh(SHARED_READ) == b_read
        assert (await b.sh("cat /dev/shm/mark 2>/dev/null || echo absent")).strip() == "absent"
        assert (await a.sh("cat /dev/shm/mark")).strip() == "only-in-a"
        assert await a.sh(SHARED_READ) == b_read
    finally:
        for clone in clones:
            await clone.stop()


async def test_a_diff_turned_back_into_a_ram_file_restores_the_todays_way(
    manager: CapsuleManager,
    template: tuple[SnapshotManifest, TemplateRam],
    short_tmp: Path,
) -> None:
    """The way out of the shared template (a template made from a clone, a fallback): the
    diff split into a full RAM file plus a device state restores as capsules start today."""
    snap, ram = template
    runtime = _runtime(manager)
    image = manager.paths.image_dir("default")
    config = clone_config(image, snap, short_tmp / "clone", ram)
    clone = await start_clone(runtime, config, snap)
    try:
        await clone.sh("echo split > /root/marker && sync")
        want = (await clone.sh(DATA)).split()[0]
        diff = short_tmp / "diff"
        await save_diff(clone.vm, diff, ram)
        await clone.stop()
        today = replace(config, ram_private_base=None)
        with diff.open("rb") as src:
            split_to_ram_file(src, short_tmp / "split.state", today.ram_file, ram)
        clone = await start_clone(runtime, today, snap, state=short_tmp / "split.state")
        assert (await clone.sh("cat /root/marker")).strip() == "split"
        assert (await clone.sh("sha256sum /root/data")).split()[0] == want
    finally:
        await clone.stop()


async def test_a_diff_against_the_wrong_template_is_a_clear_error_and_the_clone_runs_on(
    manager: CapsuleManager,
    template: tuple[SnapshotManifest, TemplateRam],
    short_tmp: Path,
) -> None:
    snap, ram = template
    runtime = _runtime(manager)
    image = manager.paths.image_dir("default")
    wrong_file = short_tmp / "wrong.mem"
    with wrong_file.open("wb") as f:
        f.truncate(128 << 20)
    wrong = TemplateRam.from_file(wrong_file)
    clone = await start_clone(runtime, clone_config(image, snap, short_tmp / "clone", ram), snap)
    try:
        diff = short_tmp / "diff"
        with pytest.raises(StreamError, match="the template"):
            await save_diff(clone.vm, diff, wrong)
        assert not diff.exists()
        # the failed save left the VM stopped and whole: it runs again
        await clone.vm.cont()
        assert (await clone.sh("echo alive")).strip() == "alive"
    finally:
        wrong.close()
        await clone.stop()
