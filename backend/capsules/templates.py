"""Warm templates: boot the template once, snapshot it with envd running, and create every
capsule by restoring that snapshot (a restore costs what a resume costs, not a cold boot).

One snapshot per (memory size, vCPUs, accelerator) lives next to the image it was booted from,
in `<image>/snapshots/<key>/` (mem, vmstate, disk.qcow2, snapshot.json), with its checksums also
recorded in the image's manifest. It is built the first time a size is asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from backend import sparse
from backend.capsules.envd_client import EnvdClient, EnvdError
from backend.capsules.errors import CapsuleError
from backend.capsules.snapshotting import fsync_file, inflate_balloon, make_overlay, sha256_file
from backend.config import Paths
from backend.image.manifest import MANIFEST_NAME
from backend.runtime import network as net
from backend.runtime.base import VMConfig, VMMError
from backend.runtime.qemu import QemuRuntime, free_port

BOOT_DEADLINE_S = 240.0
SNAPSHOT_FORMAT = 1

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TemplateSnapshot:
    key: str
    path: str
    memory_mib: int
    vcpus: int
    accel: str
    created_at: float
    build_seconds: float
    ram_allocated: int
    ram_sha256: str
    disk_allocated: int
    disk_sha256: str
    state_size: int
    state_sha256: str
    format: int = SNAPSHOT_FORMAT


def snapshot_key(memory_mib: int, vcpus: int, accel: str, network: str = "none") -> str:
    # slirp's migrated state only restores into the same network mode
    suffix = "" if network == "none" else f"-{network}"
    return f"{memory_mib}m-{vcpus}c-{accel}{suffix}"


class TemplateSnapshots:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths

    def directory(self, image_dir: Path, key: str) -> Path:
        return image_dir / "snapshots" / key

    def load(
        self, image_dir: Path, memory_mib: int, vcpus: int, accel: str, network: str = "none"
    ) -> TemplateSnapshot | None:
        key = snapshot_key(memory_mib, vcpus, accel, network)
        path = self.directory(image_dir, key)
        try:
            raw = json.loads((path / "snapshot.json").read_text())
            snap = TemplateSnapshot(**{**raw, "path": str(path)})
        except (OSError, ValueError, TypeError):
            return None
        return snap if snap.format == SNAPSHOT_FORMAT else None

    def discard(self, image_dir: Path, key: str) -> None:
        shutil.rmtree(self.directory(image_dir, key), ignore_errors=True)
        self._record(image_dir, key, None)

    async def ensure(
        self,
        image_dir: Path,
        memory_mib: int,
        vcpus: int,
        accel: str,
        progress: Progress | None = None,
        network: str = "none",
    ) -> TemplateSnapshot:
        existing = self.load(image_dir, memory_mib, vcpus, accel, network)
        if existing is not None:
            return existing
        async with self._build_lock(image_dir):
            # another process may have built it while we waited
            existing = self.load(image_dir, memory_mib, vcpus, accel, network)
            if existing is not None:
                return existing
            return await self._build(image_dir, memory_mib, vcpus, accel, network, progress)

    @contextlib.asynccontextmanager
    async def _build_lock(self, image_dir: Path) -> AsyncIterator[None]:
        (image_dir / "snapshots").mkdir(mode=0o700, exist_ok=True)
        fd = os.open(image_dir / "snapshots" / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.1)
            yield
        finally:
            os.close(fd)

    async def _build(
        self,
        image_dir: Path,
        memory_mib: int,
        vcpus: int,
        accel: str,
        network: str,
        progress: Progress | None,
    ) -> TemplateSnapshot:
        report = progress or (lambda _msg: None)
        key = snapshot_key(memory_mib, vcpus, accel, network)
        final = self.directory(image_dir, key)
        out = final.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(mode=0o700, parents=True)
        run_dir = Path(tempfile.mkdtemp(prefix="wrenn-tpl-", dir="/tmp"))
        ram_file = self.paths.shm / f"wrenn-tpl-{os.getpid()}-{key}.mem"
        started = time.monotonic()
        config = VMConfig(
            capsule_id=f"template-{key}",
            run_dir=run_dir,
            kernel=image_dir / "vmlinux",
            initrd=image_dir / "initrd.cpio.gz",
            disk=run_dir / "disk.qcow2",
            ram_file=ram_file,
            memory_mib=memory_mib,
            vcpus=vcpus,
            host_port=free_port(),
            metadata_json=json.dumps({"templateID": image_dir.name}),
            accel=accel,
            network=network,
        )
        netns = None
        if network == "internet":
            scope = net.scope_of(self.paths.state)
            netns = net.netns_for(scope, f"tpl{os.getpid():05d}"[-8:], net.free_slot(set()))
            config = replace(config, netns=netns.name, forward_host=netns.ns_ip)
        vm = None
        try:
            if netns is not None:
                await asyncio.to_thread(net.setup_netns, scope, netns)
            report(f"booting the template ({memory_mib} MiB, {vcpus} vCPU, {accel})")
            await make_overlay(image_dir / "rootfs.ext4", config.disk)
            vm = await QemuRuntime(accel).create(config)
            envd_url = f"http://{config.forward_host}:{config.host_port}"
            async with EnvdClient(envd_url, timeout=30) as envd:
                await envd.wait_healthy(BOOT_DEADLINE_S, vm.alive)
                await envd.init(timestamp=time.time())
                report("preparing the template snapshot")
                prepared = await envd.snapshot_prepare()
            await inflate_balloon(vm, memory_mib, prepared)
            async with vm.session():
                await vm.stop()
                await vm.snapshot_create(out / "vmstate")
            ram = await asyncio.to_thread(sparse.sparse_copy, ram_file, out / "mem")
            await vm.quit()
            vm = None
            disk = await asyncio.to_thread(sparse.sparse_copy, config.disk, out / "disk.qcow2")
            snap = TemplateSnapshot(
                key=key,
                path=str(final),
                memory_mib=memory_mib,
                vcpus=vcpus,
                accel=accel,
                created_at=time.time(),
                build_seconds=round(time.monotonic() - started, 2),
                ram_allocated=ram.allocated,
                ram_sha256=ram.sha256,
                disk_allocated=disk.allocated,
                disk_sha256=disk.sha256,
                state_size=(out / "vmstate").stat().st_size,
                state_sha256=sha256_file(out / "vmstate"),
            )
            (out / "snapshot.json").write_text(json.dumps(asdict(snap), indent=2))
            for name in ("vmstate", "snapshot.json"):
                fsync_file(out / name)
            sparse.fsync_dir(out)
            shutil.rmtree(final, ignore_errors=True)
            out.rename(final)
            sparse.fsync_dir(final.parent)
            self._record(image_dir, key, snap)
            report(f"template snapshot ready in {snap.build_seconds:.1f} s")
            return snap
        except (
            VMMError,
            EnvdError,
            OSError,
            net.NetworkUnavailable,
        ) as exc:
            raise CapsuleError(f"building the template snapshot {key} failed: {exc}") from exc
        finally:
            if vm is not None:
                vm.kill()
                await vm.wait_exit(5)
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            ram_file.unlink(missing_ok=True)
            if netns is not None:
                net.teardown_netns(netns)

    def _record(self, image_dir: Path, key: str, snap: TemplateSnapshot | None) -> None:
        """Keep the image manifest's list of template snapshots (and checksums) current."""
        manifest = image_dir / MANIFEST_NAME
        try:
            raw = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return
        snapshots = raw.setdefault("template_snapshots", {})
        if snap is None:
            snapshots.pop(key, None)
        else:
            entry = asdict(snap)
            entry.pop("path")
            snapshots[key] = entry
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        tmp.rename(manifest)
