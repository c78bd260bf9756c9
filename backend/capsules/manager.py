"""CapsuleManager: the one async API the dashboard and the headless CLI both use.

Lifecycle (see docs/architecture.md):
  create  : qcow2 overlay over the image rootfs -> QEMU -> envd /health -> /init      => running
  pause   : envd /snapshot/prepare -> free pages returned -> QMP stop -> device state ->
            RAM copied sparsely + disk linked into gen-N.tmp -> fsync -> rename gen-N -> quit
  resume  : RAM + disk copied out of gen-N (checksums verified in the same pass) ->
            QEMU -incoming -> cont -> /health -> /init                                 => running
A generation on disk is never written again once renamed into place; the capsule runs from
copies of it, so a failed later pause always falls back to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from backend import sparse
from backend.capsules.envd_client import EnvdClient, EnvdError, ExecResult
from backend.capsules.errors import (
    CapsuleError,
    CapsuleNotFound,
    IllegalTransition,
    SnapshotCorrupt,
)
from backend.capsules.locks import CapsuleLocks
from backend.capsules.models import Capsule, Event, Snapshot, State, new_capsule_id
from backend.capsules.snapshotting import (
    SnapshotFiles,
    copy_disk,
    copy_ram,
    fsync_file,
    inflate_balloon,
    make_overlay,
    prepare_ram_file,
    sha256_file,
)
from backend.capsules.store import Store
from backend.capsules.templates import TemplateSnapshots, snapshot_key
from backend.config import Paths
from backend.envd.protocol import ENVD_PORT
from backend.image.builder import ImageBuilder
from backend.runtime import network as net
from backend.runtime.accel import probe_accel
from backend.runtime.base import BalloonStats, VMConfig, VMMError
from backend.runtime.network import MODES, NetworkUnavailable
from backend.runtime.qemu import QemuRuntime, QemuVM, free_port, pid_is_vm

BOOT_DEADLINE_S = 180.0
RESUME_DEADLINE_S = 60.0
REPORTING_MIN_WAIT_S = 2.3
"""The guest reports freed pages only after a ~2 s delay; stopping earlier keeps them."""
REPORTING_SETTLE_S = 0.4
REPORTING_MAX_WAIT_S = 5.0

DEFAULT_MEMORY_MIB = 256

Listener = Callable[[Capsule], None]


class CapsuleManager:
    def __init__(self, paths: Paths, accel: str | None = None) -> None:
        self.paths = paths
        paths.ensure()
        self.store = Store(paths.database)
        self.locks = CapsuleLocks(paths.capsules)
        self._accel = accel
        self._runtime: QemuRuntime | None = None
        self._vms: dict[str, QemuVM] = {}
        self._listeners: list[Listener] = []
        self._watchdog: asyncio.Task[None] | None = None
        self.templates = TemplateSnapshots(paths)
        self.net_scope = net.scope_of(paths.state)
        """Tag of this agent's network namespaces, links and nftables table."""

    # -- plumbing ---------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def _save(self, capsule: Capsule) -> Capsule:
        self.store.put(capsule)
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener(capsule)
        return capsule

    def _event(self, capsule_id: str, kind: str, message: str) -> None:
        self.store.add_event(capsule_id, kind, message)

    def runtime(self, image_dir: Path) -> QemuRuntime:
        if self._runtime is None:
            accel = self._accel or probe_accel(image_dir / "vmlinux").accel
            if accel == "none":
                raise CapsuleError("QEMU cannot run guests here: run `wrenn-tui doctor`")
            self._runtime = QemuRuntime(accel)
        return self._runtime

    def run_dir(self, capsule_id: str) -> Path:
        return self.paths.capsules / capsule_id

    def snapshot_dir(self, capsule_id: str) -> Path:
        return self.paths.snapshots / capsule_id

    def ram_file(self, capsule_id: str) -> Path:
        return self.paths.shm / f"wrenn-{capsule_id}.mem"

    def vm_config(self, capsule: Capsule) -> VMConfig:
        image = Path(capsule.image_dir)
        run_dir = self.run_dir(capsule.id)
        return VMConfig(
            capsule_id=capsule.id,
            run_dir=run_dir,
            kernel=image / "vmlinux",
            initrd=image / "initrd.cpio.gz",
            disk=run_dir / "disk.qcow2",
            ram_file=self.ram_file(capsule.id),
            memory_mib=capsule.memory_mib,
            vcpus=capsule.vcpus,
            host_port=capsule.host_port,
            metadata_json=self._metadata_json(capsule),
            netns=self._netns(capsule).name if capsule.network == "internet" else None,
            forward_host=capsule.envd_host,
            accel=capsule.accel,
            guest_port=ENVD_PORT,
            network=capsule.network,
        )

    def _netns(self, capsule: Capsule) -> net.CapsuleNetns:
        assert capsule.net_slot is not None, f"{capsule.id} has no network slot"
        return net.netns_for(self.net_scope, capsule.id, capsule.net_slot)

    async def _ensure_netns(self, capsule: Capsule) -> None:
        if capsule.network == "internet":
            await asyncio.to_thread(net.setup_netns, self.net_scope, self._netns(capsule))

    def envd(self, capsule: Capsule, timeout: float = 10.0) -> EnvdClient:
        return EnvdClient(capsule.envd_url, capsule.access_token, timeout=timeout)

    def _metadata_json(self, capsule: Capsule) -> str:
        return json.dumps(
            {
                "instanceID": capsule.id,
                "templateID": capsule.template,
                "envID": capsule.template,
                "network": capsule.network,
            }
        )

    def _write_metadata(self, capsule: Capsule) -> None:
        """A copy of what the guest's metadata address serves, for people and `get`."""
        path = self.run_dir(capsule.id) / "metadata.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(self._metadata_json(capsule))
        tmp.chmod(0o600)
        tmp.rename(path)

    def _init_body(self, capsule: Capsule) -> dict[str, Any]:
        return {
            "accessToken": capsule.access_token,
            "timestamp": time.time(),
            "instanceID": capsule.id,
            "templateID": capsule.template,
            "entropy": base64.b64encode(os.urandom(64)).decode(),
        }

    # -- queries ----------------------------------------------------------------------------

    def list_capsules(self) -> list[Capsule]:
        return self.store.list_capsules()

    def get(self, capsule_id: str) -> Capsule:
        capsule = self.store.get(capsule_id)
        if capsule is None:
            raise CapsuleNotFound(f"no capsule {capsule_id!r} (see `wrenn-tui capsule list`)")
        return capsule

    def snapshots(self, capsule_id: str) -> list[Snapshot]:
        return self.store.snapshots(capsule_id)

    def events(self, capsule_id: str | None = None, limit: int = 50) -> list[Event]:
        return self.store.events(capsule_id, limit)

    def vm(self, capsule: Capsule) -> QemuVM | None:
        """The VM handle of a running capsule (adopting a VM started by another process)."""
        vm = self._vms.get(capsule.id)
        if vm is not None and vm.pid == capsule.pid:
            return vm
        if capsule.pid is None:
            return None
        config = self.vm_config(capsule)
        if not pid_is_vm(capsule.pid, config):
            return None
        vm = QemuVM(config, capsule.pid)
        self._vms[capsule.id] = vm
        return vm

    async def balloon_stats(self, capsule_id: str) -> BalloonStats | None:
        capsule = self.get(capsule_id)
        vm = self.vm(capsule) if capsule.state == State.RUNNING else None
        if vm is None or self.locks.busy(capsule_id):
            return None
        try:
            return await vm.balloon_stats()
        except VMMError:
            return None

    # -- start-up: re-adopt what an earlier agent left ----------------------------------------

    async def start(self, watchdog: bool = True) -> list[Capsule]:
        """Re-adopt capsules from the state dir; returns them in their reconciled states."""
        for capsule in self.store.list_capsules():
            async with self.locks.hold(capsule.id):
                current = self.store.get(capsule.id)
                if current is not None:
                    await self._reconcile(current)
        await self._reconcile_network()
        if watchdog and self._watchdog is None:
            self._watchdog = asyncio.create_task(self._watch(), name="capsule-watchdog")
        return self.store.list_capsules()

    async def _reconcile_network(self) -> None:
        """Remove what a crashed agent left of the internet mode: namespaces of capsules that
        are gone, and the nftables table when no capsule uses the mode; reload it otherwise."""
        capsules = [c for c in self.store.list_capsules() if c.network == "internet"]
        wanted = {self._netns(c).name for c in capsules if c.net_slot is not None}
        try:
            for name in await asyncio.to_thread(net.existing_netns, self.net_scope):
                if name not in wanted:
                    await asyncio.to_thread(net.teardown_netns_named, self.net_scope, name)
            if capsules:
                await asyncio.to_thread(net.ensure_rules, self.net_scope)
            else:
                await asyncio.to_thread(net.remove_rules, self.net_scope)
        except NetworkUnavailable as exc:
            for capsule in capsules:
                self._event(capsule.id, "error", f"network isolation unavailable: {exc}")

    async def _reconcile(self, capsule: Capsule) -> None:
        config = self.vm_config(capsule)
        alive = capsule.pid is not None and pid_is_vm(capsule.pid, config)
        state = capsule.state
        if state in (State.RUNNING, State.PENDING, State.RESUMING):
            if alive and state == State.RUNNING:
                return
            if alive:
                vm = self.vm(capsule)
                assert vm is not None
                with contextlib.suppress(VMMError):
                    await vm.cont()
                self._event(capsule.id, "adopt", f"re-adopted after an interrupted {state}")
                self._save(capsule.with_(state=State.RUNNING, reason=""))
                return
            if state == State.RESUMING and self._generation_dir(capsule, capsule.generation):
                self._save(
                    capsule.with_(
                        state=State.PAUSED, pid=None, reason="the agent stopped during resume"
                    )
                )
                return
            reason = f"QEMU (pid {capsule.pid}) is gone; {self._vmm_log_tail(capsule)}"
            self._event(capsule.id, "error", reason)
            self._save(capsule.with_(state=State.ERROR, reason=reason, pid=None))
        elif state == State.PAUSING:
            self._remove_tmp_generations(capsule.id)
            latest = self._latest_generation_on_disk(capsule.id)
            if alive:
                vm = self.vm(capsule)
                assert vm is not None
                with contextlib.suppress(VMMError):
                    await vm.cont()
                if latest > capsule.generation:
                    shutil.rmtree(self._generation_path(capsule.id, latest), ignore_errors=True)
                self._event(capsule.id, "adopt", "pause was interrupted; capsule kept running")
                self._save(
                    capsule.with_(
                        state=State.RUNNING, reason="pause interrupted by an agent restart"
                    )
                )
            elif latest > capsule.generation and self._load_generation(capsule.id, latest):
                self._cleanup_run_files(capsule)
                self._save(capsule.with_(state=State.PAUSED, pid=None, generation=latest))
            else:
                self._save(
                    capsule.with_(
                        state=State.ERROR, pid=None, reason="the agent and QEMU died during a pause"
                    )
                )
        elif state == State.PAUSED and not self._generation_dir(capsule, capsule.generation):
            self._save(
                capsule.with_(
                    state=State.ERROR, reason=f"snapshot generation {capsule.generation} missing"
                )
            )

    async def _watch(self) -> None:
        """Notice dead VMs and idle capsules (auto-pause)."""
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(Exception):
                await self.check_health()

    async def check_health(self) -> None:
        now = time.time()
        for capsule in self.store.list_capsules():
            if capsule.state != State.RUNNING or self.locks.busy(capsule.id):
                continue
            if capsule.pid is None or not pid_is_vm(capsule.pid, self.vm_config(capsule)):
                async with self.locks.hold(capsule.id):
                    current = self.store.get(capsule.id)
                    if (
                        current
                        and current.state == State.RUNNING
                        and not (current.pid and pid_is_vm(current.pid, self.vm_config(current)))
                    ):
                        reason = f"QEMU exited unexpectedly; {self._vmm_log_tail(current)}"
                        self._event(current.id, "error", reason)
                        self._vms.pop(current.id, None)
                        self._save(current.with_(state=State.ERROR, reason=reason, pid=None))
            elif capsule.auto_pause_s > 0 and now - capsule.last_activity > capsule.auto_pause_s:
                self._event(capsule.id, "auto-pause", f"idle for {capsule.auto_pause_s} s")
                with contextlib.suppress(CapsuleError):
                    await self.pause(capsule.id)

    async def close(self) -> None:
        """Stop watching; capsules keep running (they are not this process's children)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        self.store.close()

    # -- create -----------------------------------------------------------------------------

    async def create(
        self,
        memory_mib: int = DEFAULT_MEMORY_MIB,
        vcpus: int = 1,
        template: str = "default",
        auto_pause_s: int = 0,
        network: str = "none",
        cold: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> Capsule:
        """Start a capsule: restored from the template's warm snapshot (built on first use of
        a memory size), or booted from scratch with `cold=True` or when that snapshot is
        missing or fails its checksums (the event log says which)."""
        if not 64 <= memory_mib <= 65536:
            raise CapsuleError(f"memory must be 64..65536 MiB, not {memory_mib}")
        if not 1 <= vcpus <= 64:
            raise CapsuleError(f"vCPUs must be 1..64, not {vcpus}")
        if network not in MODES:
            raise CapsuleError(f"unknown network mode {network!r}: use one of {', '.join(MODES)}")
        slot = None
        if network == "internet":
            reason = net.internet_unavailable_reason()
            if reason is not None:
                raise CapsuleError(f"network mode 'internet' is unavailable: {reason}")
            used = {c.net_slot for c in self.store.list_capsules() if c.net_slot is not None}
            slot = net.free_slot(used)
        builder = ImageBuilder(self.paths, template)
        manifest = builder.installed()
        if manifest is None:
            raise CapsuleError(f"no image {template!r}: run `wrenn-tui image build`")
        image_dir = builder.image_dir.resolve()
        runtime = self.runtime(image_dir)
        capsule = Capsule(
            id=new_capsule_id(),
            state=State.PENDING,
            template=template,
            image_dir=str(image_dir),
            memory_mib=memory_mib,
            vcpus=vcpus,
            created_at=time.time(),
            host_port=free_port(),
            access_token=secrets.token_urlsafe(24),
            network=network,
            auto_pause_s=auto_pause_s,
            last_activity=time.time(),
            accel=runtime.accel,
            net_slot=slot,
        )
        if slot is not None:
            capsule = capsule.with_(envd_host=net.netns_for(self.net_scope, capsule.id, slot).ns_ip)
        async with self.locks.hold(capsule.id):
            run_dir = self.run_dir(capsule.id)
            run_dir.mkdir(parents=True, mode=0o700)
            self._save(capsule)
            try:
                await self._ensure_netns(capsule)
            except NetworkUnavailable as exc:
                reason = f"create failed: network mode 'internet' is unavailable: {exc}"
                self._save(capsule.with_(state=State.ERROR, reason=reason))
                raise CapsuleError(reason) from exc
            self._event(
                capsule.id,
                "create",
                f"{memory_mib} MiB, {vcpus} vCPU, {template} {manifest.version}, {runtime.accel}",
            )
            started = time.monotonic()
            warm = None if cold else await self._warm_start(capsule, image_dir, progress)
            if warm is not None:
                capsule = warm
            else:
                capsule = await self._cold_start(capsule, image_dir, runtime)
            boot_s = time.monotonic() - started
            how = "restored from the template snapshot" if warm else "booted cold"
            self._event(capsule.id, "running", f"{how} in {boot_s:.2f} s")
            return self._save(
                capsule.with_(
                    state=State.RUNNING,
                    started_at=time.time(),
                    last_activity=time.time(),
                    extra={**capsule.extra, "boot_s": boot_s, "start": "warm" if warm else "cold"},
                )
            )

    async def _warm_start(
        self, capsule: Capsule, image_dir: Path, progress: Callable[[str], None] | None
    ) -> Capsule | None:
        """Restore the template snapshot as this capsule; None means: boot cold instead."""
        key = snapshot_key(capsule.memory_mib, capsule.vcpus, capsule.accel, capsule.network)
        try:
            snap = await self.templates.ensure(
                image_dir,
                capsule.memory_mib,
                capsule.vcpus,
                capsule.accel,
                progress,
                network=capsule.network,
            )
        except CapsuleError as exc:
            self._event(capsule.id, "cold-boot", f"no template snapshot ({exc}); cold boot")
            return None
        try:
            restored, _ = await self._restore_from(capsule, snap, f"template snapshot {key}")
            return restored
        except (SnapshotCorrupt, VMMError, EnvdError, OSError) as exc:
            await self._kill(capsule)
            self._cleanup_run_files(capsule)
            if isinstance(exc, SnapshotCorrupt):
                self.templates.discard(image_dir, key)
            self._event(capsule.id, "cold-boot", f"template snapshot unusable ({exc}); cold boot")
            return None

    async def _cold_start(self, capsule: Capsule, image_dir: Path, runtime: QemuRuntime) -> Capsule:
        run_dir = self.run_dir(capsule.id)
        try:
            await make_overlay(image_dir / "rootfs.ext4", run_dir / "disk.qcow2")
            self._write_metadata(capsule)
            vm = await runtime.create(self.vm_config(capsule))
            self._vms[capsule.id] = vm
            capsule = self._save(capsule.with_(pid=vm.pid))
            async with self.envd(capsule) as envd:
                await envd.wait_healthy(BOOT_DEADLINE_S, vm.alive)
                await envd.init(**self._init_body(capsule))
        except (VMMError, EnvdError, OSError, CapsuleError) as exc:
            await self._kill(capsule)
            reason = f"create failed: {exc}"
            self._event(capsule.id, "error", reason)
            self._save(capsule.with_(state=State.ERROR, reason=reason, pid=None))
            raise CapsuleError(reason) from exc
        return capsule

    # -- pause ------------------------------------------------------------------------------

    async def pause(self, capsule_id: str, prepare: bool = True) -> Snapshot:
        """Snapshot a running capsule to disk and stop its VM.

        `prepare=False` skips the guest's page-cache drop: the snapshot then holds the whole
        page cache (benchmarks use it to show what the preparation saves).
        """
        async with self.locks.hold(capsule_id):
            capsule = self.get(capsule_id)
            if capsule.state != State.RUNNING:
                raise IllegalTransition(f"cannot pause {capsule_id}: it is {capsule.state}")
            vm = self.vm(capsule)
            if vm is None:
                raise CapsuleError(f"cannot pause {capsule_id}: its QEMU is not running")
            capsule = self._save(capsule.with_(state=State.PAUSING))
            try:
                snapshot = await self._pause(capsule, vm, prepare)
            except BaseException as exc:
                if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                    reason = (
                        f"pause failed: no space left on the disk holding "
                        f"{self.snapshot_dir(capsule_id)}; the capsule keeps running and its "
                        f"last snapshot (generation {capsule.generation}) is untouched. "
                        "Free some space and pause again"
                    )
                else:
                    reason = f"pause failed: {exc}"
                self._event(capsule_id, "error", reason)
                alive = vm.alive()
                self._save(
                    capsule.with_(
                        state=State.RUNNING if alive else State.ERROR,
                        reason=reason,
                        pid=capsule.pid if alive else None,
                    )
                )
                if isinstance(exc, Exception):
                    raise CapsuleError(reason) from exc
                raise
            return snapshot

    async def _pause(self, capsule: Capsule, vm: QemuVM, prepare: bool) -> Snapshot:
        started = time.monotonic()
        ram_file = self.ram_file(capsule.id)
        timings: dict[str, float] = {}
        async with self.envd(capsule, timeout=30) as envd:
            inflated = False
            if prepare:
                try:
                    prepared = await envd.snapshot_prepare()
                except EnvdError as exc:
                    raise CapsuleError(f"envd could not prepare the snapshot: {exc}") from exc
                timings["prepare"] = time.monotonic() - started
                inflated = await inflate_balloon(vm, capsule.memory_mib, prepared)
                if not inflated:
                    await self._wait_free_page_reporting(ram_file)
                timings["reclaim"] = time.monotonic() - started
            generation = capsule.generation + 1
            final = self._generation_path(capsule.id, generation)
            tmp = final.with_name(final.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True, mode=0o700)
            self.snapshot_dir(capsule.id).chmod(0o700)
            stopped = False
            try:
                async with vm.session():
                    await vm.stop()
                    stopped = True
                    await vm.snapshot_create(tmp / "vmstate")
                timings["device_state"] = time.monotonic() - started
                ram = await asyncio.to_thread(sparse.sparse_copy, ram_file, tmp / "mem")
                timings["ram_copy"] = time.monotonic() - started
                disk_src = self.run_dir(capsule.id) / "disk.qcow2"
                try:
                    os.link(disk_src, tmp / "disk.qcow2")
                    disk_sha = await asyncio.to_thread(sparse.sparse_checksum, tmp / "disk.qcow2")
                except OSError as exc:
                    if exc.errno != errno.EXDEV:  # snapshots on another filesystem
                        raise
                    disk = await asyncio.to_thread(sparse.sparse_copy, disk_src, tmp / "disk.qcow2")
                    disk_sha = disk.sha256
                state_sha = sha256_file(tmp / "vmstate")
                snapshot = Snapshot(
                    capsule_id=capsule.id,
                    generation=generation,
                    path=str(final),
                    created_at=time.time(),
                    ram_size=ram.size,
                    ram_allocated=ram.allocated,
                    ram_sha256=ram.sha256,
                    disk_allocated=sparse.allocated_bytes(tmp / "disk.qcow2"),
                    disk_sha256=disk_sha,
                    state_size=(tmp / "vmstate").stat().st_size,
                    state_sha256=state_sha,
                    pause_seconds=0.0,
                )
                (tmp / "snapshot.json").write_text(json.dumps(snapshot.__dict__))
                for name in ("vmstate", "disk.qcow2", "snapshot.json"):
                    fsync_file(tmp / name)
                sparse.fsync_dir(tmp)
                tmp.rename(final)
                sparse.fsync_dir(final.parent)
                timings["durable"] = time.monotonic() - started
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                if stopped and vm.alive():
                    with contextlib.suppress(VMMError):
                        await vm.cont()
                if inflated and vm.alive():
                    with contextlib.suppress(VMMError):
                        await vm.balloon_set(capsule.memory_mib << 20)
                with contextlib.suppress(EnvdError):
                    await envd.snapshot_abort()
                raise
        # The generation is durable: from here the capsule is paused whatever else fails.
        self._vms.pop(capsule.id, None)
        try:
            await vm.quit()
        except Exception as exc:  # the snapshot is safe; a stuck QEMU is killed
            self._event(capsule.id, "warning", f"QEMU did not quit cleanly: {exc}")
            vm.kill()
        pause_s = time.monotonic() - started
        timings["quit"] = pause_s
        snapshot = Snapshot(**{**snapshot.__dict__, "pause_seconds": pause_s})
        self.store.put_snapshot(snapshot)
        self._save(
            capsule.with_(
                state=State.PAUSED,
                pid=None,
                generation=generation,
                reason="",
                extra={
                    **capsule.extra,
                    "pause_timings": {k: round(v, 3) for k, v in timings.items()},
                },
            )
        )
        self._cleanup_run_files(capsule)
        for old in self.store.snapshots(capsule.id):
            if old.generation < generation:
                shutil.rmtree(old.path, ignore_errors=True)
                self.store.delete_snapshot(capsule.id, old.generation)
        self._event(
            capsule.id,
            "paused",
            f"generation {generation}: {snapshot.total_allocated / 2**20:.1f} MiB "
            f"in {pause_s:.2f} s",
        )
        return snapshot

    async def _wait_free_page_reporting(self, ram_file: Path) -> None:
        """Wait until the guest has handed the freed page cache back (RAM file shrinks)."""
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

    def _cleanup_run_files(self, capsule: Capsule) -> None:
        self.ram_file(capsule.id).unlink(missing_ok=True)
        run_dir = self.run_dir(capsule.id)
        for name in ("disk.qcow2", "qmp.sock", "qemu.pid"):
            (run_dir / name).unlink(missing_ok=True)

    # -- resume -----------------------------------------------------------------------------

    async def resume(self, capsule_id: str) -> Capsule:
        async with self.locks.hold(capsule_id):
            capsule = self.get(capsule_id)
            if capsule.state != State.PAUSED:
                raise IllegalTransition(f"cannot resume {capsule_id}: it is {capsule.state}")
            snapshot = self._load_generation(capsule.id, capsule.generation)
            if snapshot is None:
                raise CapsuleError(
                    f"snapshot generation {capsule.generation} of {capsule_id} is missing"
                )
            started = time.monotonic()
            capsule = self._save(capsule.with_(state=State.RESUMING))
            try:
                capsule = await self._resume(capsule, snapshot)
            except BaseException as exc:
                await self._kill(capsule)
                self._cleanup_run_files(capsule)
                reason = f"resume failed: {exc}"
                self._event(capsule_id, "error", reason)
                self._save(capsule.with_(state=State.PAUSED, pid=None, reason=reason))
                if isinstance(exc, CapsuleError):
                    raise
                if isinstance(exc, Exception):
                    raise CapsuleError(reason) from exc
                raise
            resume_s = time.monotonic() - started
            self._event(
                capsule_id,
                "running",
                f"resumed generation {snapshot.generation} in {resume_s:.2f} s",
            )
            return self._save(capsule.with_(extra={**capsule.extra, "resume_s": resume_s}))

    async def _restore_from(
        self, capsule: Capsule, files: SnapshotFiles, what: str
    ) -> tuple[Capsule, dict[str, float]]:
        """Run `capsule` from copies of a snapshot's files; envd answers and is initialised."""
        started = time.monotonic()
        timings: dict[str, float] = {}
        run_dir = self.run_dir(capsule.id)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ram_file = self.ram_file(capsule.id)
        await copy_disk(files, run_dir / "disk.qcow2", what)
        await asyncio.to_thread(prepare_ram_file, files, ram_file)
        if (
            capsule.network == "internet"
            and not Path(f"/run/netns/{self._netns(capsule).name}").exists()
        ):
            await self._ensure_netns(capsule)
        timings["disk_copy"] = time.monotonic() - started
        self._write_metadata(capsule)
        runtime = self.runtime(Path(capsule.image_dir))
        config = self.vm_config(capsule)
        with contextlib.suppress(OSError):
            config.console_log.rename(config.console_log.with_suffix(".log.1"))
        # QEMU starts while the RAM file fills: it maps the file but touches no guest memory
        # before the device state is loaded, which waits for the copy (and its checksum)
        vm = await runtime.restore(
            config, Path(files.path) / "vmstate", ready=copy_ram(files, ram_file, what)
        )
        timings["restore"] = time.monotonic() - started
        self._vms[capsule.id] = vm
        capsule = self._save(capsule.with_(pid=vm.pid))
        async with self.envd(capsule) as envd:
            await envd.wait_healthy(RESUME_DEADLINE_S, vm.alive)
            timings["health"] = time.monotonic() - started
            # snapshots are taken with the balloon inflated: give the guest its RAM back, while
            # envd takes its identity, clock and entropy
            await asyncio.gather(
                vm.balloon_set(capsule.memory_mib << 20), envd.init(**self._init_body(capsule))
            )
            timings["init"] = time.monotonic() - started
        return capsule, {k: round(v, 3) for k, v in timings.items()}

    async def _resume(self, capsule: Capsule, snapshot: Snapshot) -> Capsule:
        try:
            capsule, timings = await self._restore_from(
                capsule, snapshot, f"generation {snapshot.generation}"
            )
        except SnapshotCorrupt as exc:
            raise SnapshotCorrupt(f"{exc}; the capsule stays paused") from exc
        extra = {**capsule.extra, "resume_timings": timings}
        return capsule.with_(
            extra=extra,
            state=State.RUNNING,
            started_at=time.time(),
            reason="",
            last_activity=time.time(),
        )

    # -- destroy ----------------------------------------------------------------------------

    async def destroy(self, capsule_id: str) -> None:
        async with self.locks.hold(capsule_id):
            capsule = self.get(capsule_id)
            await self._kill(capsule)
            self._cleanup_run_files(capsule)
            shutil.rmtree(self.run_dir(capsule_id), ignore_errors=True)
            shutil.rmtree(self.snapshot_dir(capsule_id), ignore_errors=True)
            if capsule.network == "internet" and capsule.net_slot is not None:
                await asyncio.to_thread(net.teardown_netns, self._netns(capsule))
            self.store.delete(capsule_id)
            self._event(capsule_id, "destroy", "destroyed")
            self._vms.pop(capsule_id, None)
        self.locks.remove(capsule_id)

    async def _kill(self, capsule: Capsule) -> None:
        vm = self._vms.pop(capsule.id, None) or self.vm(capsule)
        self._vms.pop(capsule.id, None)
        if vm is not None and vm.alive():
            vm.kill()
            await vm.wait_exit(5)

    # -- exec -------------------------------------------------------------------------------

    async def exec(self, capsule_id: str, cmd: str, timeout: float = 60.0) -> ExecResult:
        capsule = self.get(capsule_id)
        if capsule.state != State.RUNNING:
            raise IllegalTransition(f"cannot exec in {capsule_id}: it is {capsule.state}")
        self.touch(capsule_id)
        async with self.envd(capsule, timeout=timeout + 10) as envd:
            try:
                return await envd.exec(cmd, timeout=timeout)
            except EnvdError as exc:
                raise CapsuleError(f"exec in {capsule_id} failed: {exc}") from exc

    def touch(self, capsule_id: str) -> None:
        """Record activity (exec, PTY input): resets the auto-pause timer."""
        capsule = self.store.get(capsule_id)
        if capsule is not None and capsule.state == State.RUNNING:
            self.store.put(capsule.with_(last_activity=time.time()))

    # -- generations on disk ----------------------------------------------------------------

    def _generation_path(self, capsule_id: str, generation: int) -> Path:
        return self.snapshot_dir(capsule_id) / f"gen-{generation:06d}"

    def _generation_dir(self, capsule: Capsule, generation: int) -> Path | None:
        path = self._generation_path(capsule.id, generation)
        return path if (path / "snapshot.json").is_file() else None

    def _load_generation(self, capsule_id: str, generation: int) -> Snapshot | None:
        path = self._generation_path(capsule_id, generation)
        try:
            raw = json.loads((path / "snapshot.json").read_text())
            return Snapshot(**{**raw, "path": str(path)})
        except (OSError, ValueError, TypeError):
            return None

    def _latest_generation_on_disk(self, capsule_id: str) -> int:
        latest = 0
        directory = self.snapshot_dir(capsule_id)
        if directory.is_dir():
            for path in directory.glob("gen-*"):
                if path.suffix != ".tmp" and (path / "snapshot.json").is_file():
                    with contextlib.suppress(ValueError):
                        latest = max(latest, int(path.name.removeprefix("gen-")))
        return latest

    def _remove_tmp_generations(self, capsule_id: str) -> None:
        directory = self.snapshot_dir(capsule_id)
        if directory.is_dir():
            for path in directory.glob("gen-*.tmp"):
                shutil.rmtree(path, ignore_errors=True)

    def _vmm_log_tail(self, capsule: Capsule) -> str:
        try:
            text = (self.run_dir(capsule.id) / "qemu.log").read_text(errors="replace").strip()
        except OSError:
            text = ""
        return f"QEMU log: {text[-300:]}" if text else "see the console log"
