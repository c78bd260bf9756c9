"""CapsuleManager: the one async API the dashboard, the headless CLI and the agent API use.

It orchestrates; the pieces live beside it:
  layout.py      where every file of a capsule lives
  snapshots.py   the one snapshot writer (capture, commit) and reader (restore, bring_up)
  templates.py   built-in templates (images, warm snapshots) and user templates
  reconcile.py   re-adoption of what an earlier agent left; watchdog.py: dead VMs, auto-pause
  actions.py     which operation applies in which state
The VMM is reached only through the runtime interface (backend/runtime/base.py), envd only
through the Envd interface (guest.py): tests drive failure paths with fakes of both.

Lifecycle:
  create  : from a template's snapshot (an image's warm snapshot, or a user template), or a
            cold boot -> envd /health -> /init                                     => running
  pause   : capture (envd prepare, balloon, stop, device state, RAM + disk) -> gen-N.tmp ->
            rename gen-N -> VMM quits                                               => paused
  resume  : restore from gen-N (checksums verified while copying) -> /health -> /init
  fork    : capture of the source at one instant (it keeps running) -> N restores
  template: capture of a running or paused capsule -> disk flattened -> renamed into place
A generation on disk is never written again once renamed into place; the capsule runs from
copies of it, so a failed later pause always falls back to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from backend import sparse
from backend.capsules import copying, pausing, snapshots
from backend.capsules.actions import Action, require
from backend.capsules.disks import make_overlay
from backend.capsules.envd_client import EnvdError, ExecResult
from backend.capsules.errors import CapsuleError, CapsuleNotFound, SnapshotCorrupt
from backend.capsules.guest import (
    BOOT_DEADLINE_S,
    RESUME_DEADLINE_S,
    Envd,
    EnvdFactory,
    init_body,
    metadata_json,
    real_envd,
)
from backend.capsules.layout import CapsuleLayout
from backend.capsules.locks import CapsuleLocks
from backend.capsules.models import Capsule, Event, Snapshot, State, new_capsule_id
from backend.capsules.networking import CapsuleNetworks, NetworkUnavailable
from backend.capsules.ramdiff import RamBases
from backend.capsules.snapshots import (
    RAM_BASE,
    RAM_BASE_SHA256,
    DiskFrom,
    RamBase,
    SnapshotManifest,
)
from backend.capsules.store import Store
from backend.capsules.templates import (
    Template,
    TemplateStore,
    WarmSnapshots,
    snapshot_key,
)
from backend.config import Paths
from backend.runtime.accel import probe_accel
from backend.runtime.base import VM, BalloonStats, Runtime, VMConfig, VMMError
from backend.runtime.ports import free_port
from backend.runtime.qemu import QemuRuntime

DEFAULT_MEMORY_MIB = 256
DEFAULT_TEMPLATE = "default"
CAPSULE_ID_RULE = re.compile(r"cl-[0-9a-z]{12}")
TRIM_DELAY_S = 2.0
"""How long after a clone's pause its base is trimmed (trim_bases_soon)."""

Listener = Callable[[Capsule], None]
Progress = Callable[[str], None]


class CapsuleManager:
    def __init__(
        self,
        paths: Paths,
        accel: str | None = None,
        *,
        runtime: Runtime | None = None,
        envd: EnvdFactory = real_envd,
        clones: bool = True,
    ) -> None:
        """`runtime` and `envd` exist for tests (fakes that fail on cue); by default the
        runtime is QEMU with the probed accelerator (or `accel`). `clones=False` gives every
        capsule made from a template a private copy of its RAM instead of a copy-on-write
        mapping (what was done before issue 21; benchmarks compare the two)."""
        self.clones = clones
        self.paths = paths
        paths.ensure()
        self.layout = CapsuleLayout(paths)
        self.layout.ensure()
        self.store = Store(paths.database)
        self.locks = CapsuleLocks(paths.capsules)
        self.networks = CapsuleNetworks(paths.state)
        self.templates = TemplateStore(paths, self.layout)
        self.bases = RamBases()
        self.warm = WarmSnapshots(self.layout, self.runtime, envd, self.bases)
        self._accel = accel
        self._runtime = runtime
        self._envd = envd
        self._vms: dict[str, VM] = {}
        self._listeners: list[Listener] = []
        self._watchdog: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[None]] = set()
        self._trim_pending = False

    # -- plumbing ---------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener)

    def save(self, capsule: Capsule) -> Capsule:
        """Record a capsule and tell every listener (the dashboard) about it."""
        self.store.put(capsule)
        for listener in list(self._listeners):
            with contextlib.suppress(Exception):
                listener(capsule)
        return capsule

    def event(self, capsule_id: str, kind: str, message: str) -> None:
        self.store.add_event(capsule_id, kind, message)

    def runtime(self, image_dir: Path) -> Runtime:
        if self._runtime is None:
            accel = self._accel or probe_accel(image_dir / "vmlinux").accel
            if accel == "none":
                raise CapsuleError("QEMU cannot run guests here: run `wrenn-tui doctor`")
            self._runtime = QemuRuntime(accel)
        return self._runtime

    def vm_config(self, capsule: Capsule) -> VMConfig:
        image = Path(capsule.image_dir)
        return VMConfig(
            capsule_id=capsule.id,
            run_dir=self.layout.run_dir(capsule.id),
            kernel=image / "vmlinux",
            initrd=image / "initrd.cpio.gz",
            disk=self.layout.disk(capsule.id),
            ram_file=self.layout.ram_file(capsule.id),
            memory_mib=capsule.memory_mib,
            vcpus=capsule.vcpus,
            host_port=capsule.host_port,
            metadata_json=metadata_json(capsule),
            netns=self.networks.netns_name(capsule),
            forward_host=capsule.envd_host,
            accel=capsule.accel,
            network=capsule.network,
            agent_disk=self.layout.agent_disk(image),
        )

    def envd(self, capsule: Capsule, timeout: float = 10.0, token: str | None = None) -> Envd:
        """A client for the capsule's envd (with `token` instead of the capsule's own)."""
        return self._envd(capsule.envd_url, token or capsule.access_token, timeout)

    def vm(self, capsule: Capsule) -> VM | None:
        """The VM of a running capsule (one started by another process included)."""
        vm = self._vms.get(capsule.id)
        if vm is not None and vm.pid == capsule.pid:
            return vm
        if capsule.pid is None:
            return None
        vm = self.runtime(Path(capsule.image_dir)).attach(self.vm_config(capsule), capsule.pid)
        if vm is not None:
            self._vms[capsule.id] = vm
        return vm

    def vm_alive(self, capsule: Capsule) -> bool:
        vm = self.vm(capsule)
        return vm is not None and vm.alive()

    def forget_vm(self, capsule_id: str) -> None:
        self._vms.pop(capsule_id, None)

    def vmm_log_tail(self, capsule: Capsule) -> str:
        try:
            text = self.layout.vmm_log(capsule.id).read_text(errors="replace").strip()
        except OSError:
            text = ""
        return f"QEMU log: {text[-300:]}" if text else "see the console log"

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

    async def balloon_stats(self, capsule_id: str) -> BalloonStats | None:
        capsule = self.get(capsule_id)
        vm = self.vm(capsule) if capsule.state == State.RUNNING else None
        if vm is None or self.locks.busy(capsule_id):
            return None
        try:
            return await vm.balloon_stats()
        except VMMError:
            return None

    def list_templates(self, include_hidden: bool = False) -> list[Template]:
        """Images and saved templates (with `include_hidden`: recipe layers too)."""
        return self.templates.all(include_hidden)

    def template_users(self, name: str) -> list[str]:
        """Capsules whose disk (or snapshot) builds on template `name`."""
        return [c.id for c in self.store.list_capsules() if c.template == name]

    # -- start-up and shutdown --------------------------------------------------------------

    async def start(self, watchdog: bool = True) -> list[Capsule]:
        """Re-adopt what an earlier agent left (backend/capsules/reconcile.py); start the
        watchdog. Returns the capsules in their reconciled states."""
        from backend.capsules.reconcile import Reconciler
        from backend.capsules.watchdog import Watchdog

        await Reconciler(self).run()
        if watchdog and self._watchdog is None:
            self._watchdog = asyncio.create_task(Watchdog(self).run(), name="capsule-watchdog")
        return self.store.list_capsules()

    async def close(self) -> None:
        """Stop watching; capsules keep running (they are not this process's children)."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for task in list(self._background):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.store.close()
        self.bases.close()

    # -- create -----------------------------------------------------------------------------

    async def create(
        self,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        template: str = DEFAULT_TEMPLATE,
        auto_pause_s: int = 0,
        network: str | None = None,
        cold: bool = False,
        progress: Progress | None = None,
        capsule_id: str | None = None,
        labels: dict[str, object] | None = None,
    ) -> Capsule:
        """Start a capsule from a template: a user template's snapshot (its size and network
        mode are the template's), or an image's warm snapshot (built on first use of a size),
        or a cold boot of the image with `cold=True` or when that snapshot is missing or fails
        its checksums (the event log says which). `capsule_id` (default: a new one) lets a caller
        name the capsule before it exists (an API answering before the start is done).
        `labels` go into the capsule's `extra` from its first record (a recipe build marks its
        capsule so)."""
        if capsule_id is not None:
            _check_new_id(capsule_id, self.store.get(capsule_id))
        found = self.templates.get(template)
        if not found.builtin:
            if cold:
                raise CapsuleError(
                    f"template {template!r} is a saved capsule state: it cannot boot cold"
                )
            return await self._create_from_template(
                found, memory_mib, vcpus, network, auto_pause_s, labels or {}, capsule_id
            )
        memory_mib = DEFAULT_MEMORY_MIB if memory_mib is None else memory_mib
        vcpus = 1 if vcpus is None else vcpus
        network = network or "none"
        _check_size(memory_mib, vcpus)
        self.networks.check_mode(network)
        image_dir = Path(found.image_dir)
        runtime = self.runtime(image_dir)
        capsule = self._new_capsule(
            template,
            image_dir,
            memory_mib,
            vcpus,
            network,
            auto_pause_s,
            runtime.accel,
            **(labels or {}),
        )
        if capsule_id is not None:
            capsule = capsule.with_(id=capsule_id)
        async with self.locks.hold(capsule.id):
            capsule = await self._register(capsule)
            self.event(
                capsule.id,
                "create",
                f"{memory_mib} MiB, {vcpus} vCPU, {template} {found.source}, {runtime.accel}",
            )
            started = time.monotonic()
            warm = None if cold else await self._warm_start(capsule, image_dir, progress)
            capsule = warm if warm is not None else await self._cold_start(capsule, image_dir)
            how = "restored from the template snapshot" if warm else "booted cold"
            return self._running(capsule, started, how, "warm" if warm else "cold")

    def _new_capsule(
        self,
        template: str,
        image_dir: Path,
        memory_mib: int,
        vcpus: int,
        network: str,
        auto_pause_s: int,
        accel: str,
        **extra: object,
    ) -> Capsule:
        return Capsule(
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
            accel=accel,
            extra=dict(extra),
        )

    async def _register(self, capsule: Capsule) -> Capsule:
        """Record a new pending capsule with its run dir (and network namespace)."""
        capsule = self.networks.allocate(capsule, self.store.list_capsules())
        self.layout.run_dir(capsule.id).mkdir(parents=True, mode=0o700)
        self.save(capsule)
        try:
            await self.networks.ensure(capsule)
        except NetworkUnavailable as exc:
            reason = f"create failed: network mode 'internet' is unavailable: {exc}"
            self.save(capsule.with_(state=State.ERROR, reason=reason))
            raise CapsuleError(reason) from exc
        return capsule

    def _running(self, capsule: Capsule, started: float, how: str, start: str) -> Capsule:
        boot_s = time.monotonic() - started
        self.event(capsule.id, "running", f"{how} in {boot_s:.2f} s")
        extra = {k: v for k, v in capsule.extra.items() if k != "init_token"}
        return self.save(
            capsule.with_(
                state=State.RUNNING,
                started_at=time.time(),
                last_activity=time.time(),
                reason="",
                extra={**extra, "boot_s": boot_s, "start": start},
            )
        )

    async def _warm_start(
        self, capsule: Capsule, image_dir: Path, progress: Progress | None
    ) -> Capsule | None:
        """Restore the image's warm snapshot as this capsule; None means: boot cold instead."""
        key = snapshot_key(capsule.memory_mib, capsule.vcpus, capsule.accel, capsule.network)
        try:
            snap = await self.warm.ensure(
                image_dir,
                capsule.memory_mib,
                capsule.vcpus,
                capsule.accel,
                capsule.network,
                progress,
            )
        except CapsuleError as exc:
            self.event(capsule.id, "cold-boot", f"no template snapshot ({exc}); cold boot")
            return None
        try:
            restored, _ = await self._start_from(
                capsule, snap, DiskFrom(), f"template snapshot {key}", share=self.clones
            )
            return restored
        except (SnapshotCorrupt, VMMError, EnvdError, OSError) as exc:
            await self._kill(capsule)
            self.layout.cleanup_run_files(capsule.id)
            if isinstance(exc, SnapshotCorrupt):
                self.warm.discard(image_dir, key)
            self.event(capsule.id, "cold-boot", f"template snapshot unusable ({exc}); cold boot")
            return None

    async def _cold_start(self, capsule: Capsule, image_dir: Path) -> Capsule:
        config = self.vm_config(capsule)
        try:
            await make_overlay(image_dir / "rootfs.ext4", config.disk)
            self._write_metadata(capsule)
            self.layout.ensure_ram_dir()
            await asyncio.to_thread(sparse.create_holes, config.ram_file, capsule.memory_mib << 20)
            vm = await self.runtime(image_dir).create(config)
            capsule = self._started(capsule, vm)
            async with self.envd(capsule) as envd:
                await envd.wait_healthy(BOOT_DEADLINE_S, vm.alive)
                await envd.init(**init_body(capsule))
        except (VMMError, EnvdError, OSError, CapsuleError) as exc:
            await self._kill(capsule)
            reason = f"create failed: {exc}"
            self.event(capsule.id, "error", reason)
            self.save(capsule.with_(state=State.ERROR, reason=reason, pid=None))
            raise CapsuleError(reason) from exc
        return capsule

    def _started(self, capsule: Capsule, vm: VM) -> Capsule:
        """Record a VM's pid the moment it exists; a VM that cannot be recorded is killed
        (an unrecorded VM would run on with nobody to stop it)."""
        self._vms[capsule.id] = vm
        try:
            return self.save(capsule.with_(pid=vm.pid))
        except BaseException:
            vm.kill()
            self._vms.pop(capsule.id, None)
            raise

    def _write_metadata(self, capsule: Capsule) -> None:
        """A copy of what the guest's metadata address serves, for people and `get`."""
        path = self.layout.metadata_file(capsule.id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(metadata_json(capsule))
        tmp.chmod(0o600)
        tmp.rename(path)

    async def _base_for(self, snapshot: SnapshotManifest, share: bool, what: str) -> RamBase | None:
        """The RAM a capsule restored from `snapshot` maps privately: a diff's base, or with
        `share` the snapshot itself (a template); None: a RAM file of its own."""
        if snapshot.ram_base is not None:
            return await snapshots.open_base(
                self.bases, Path(snapshot.ram_base), snapshot.ram_base_sha256, what
            )
        if share:
            return await snapshots.open_base(
                self.bases, snapshot.directory, snapshot.ram_sha256, what
            )
        return None

    def prefetch_base(self, directory: Path) -> None:
        """Seal a new template's RAM in memory in the background, so the first capsule made
        from it does not wait for that (~0.15 s for 90 MiB here)."""
        self._in_background(
            lambda: snapshots.open_base(self.bases, directory, None, str(directory))
        )

    def trim_bases_soon(self) -> None:
        """In the background, give back the template pages a clone's pause faulted in (its
        save reads every page of its RAM: ramdiff.TemplateRam.trim), TRIM_DELAY_S later and
        once for the pauses in between: reclaiming ~170 MiB takes ~0.1 s of kernel work, which
        slowed a resume started right after the pause (its restore 0.06-0.09 s without, 0.11-
        0.21 s with)."""
        if self._trim_pending:
            return
        self._trim_pending = True

        async def later() -> None:
            try:
                await asyncio.sleep(TRIM_DELAY_S)
            finally:
                self._trim_pending = False
            await self.bases.trim()

        self._in_background(later)

    def _in_background(self, work: Callable[[], Awaitable[object]]) -> None:
        """Run `work()` on its own; its failure only loses what it would have saved (close()
        cancels what is still running)."""

        async def quietly() -> None:
            with contextlib.suppress(Exception):
                await work()

        task = asyncio.ensure_future(quietly())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def running_base(self, capsule: Capsule) -> RamBase | None:
        """The base a running clone's RAM maps (None: the capsule has a RAM file of its own)."""
        path = capsule.extra.get(RAM_BASE)
        if not isinstance(path, str):
            return None
        sha = capsule.extra.get(RAM_BASE_SHA256)
        return await snapshots.open_base(
            self.bases,
            Path(path),
            sha if isinstance(sha, str) else None,
            f"the memory of {capsule.id}",
        )

    async def _start_from(
        self,
        capsule: Capsule,
        snapshot: SnapshotManifest,
        disk: DiskFrom,
        what: str,
        token: str | None = None,
        init_extra: dict[str, object] | None = None,
        *,
        share: bool = False,
        verify: bool = True,
    ) -> tuple[Capsule, dict[str, float]]:
        """Run `capsule` from a snapshot: envd answers and has the capsule's identity.

        `token` is the one envd holds in that snapshot (default: the capsule's own);
        `init_extra`: more /init fields (a template's process defaults). `share`: start as a
        clone of the snapshot (a template): its RAM a private mapping of the snapshot's. A
        diff is always restored on its base. `verify=False`: see `snapshots.restore`."""
        started = time.monotonic()
        base = await self._base_for(snapshot, share, what)
        capsule = capsule.with_(extra=snapshots.with_base(capsule.extra, base))
        run_dir = self.layout.run_dir(capsule.id)
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.layout.ensure_ram_dir()
        await self.networks.ensure(capsule)
        self._write_metadata(capsule)
        config = self.vm_config(capsule)
        with contextlib.suppress(OSError):
            config.console_log.rename(config.console_log.with_suffix(".log.1"))
        holder: list[Capsule] = []

        def recorded(vm: VM) -> None:
            holder.append(self._started(capsule, vm))

        vm, timings = await snapshots.restore(
            self.runtime(Path(capsule.image_dir)),
            config,
            snapshot,
            disk,
            what,
            started=recorded,
            base=base,
            verify=verify,
        )
        capsule = holder[0]
        async with self.envd(capsule, token=token or snapshot.envd_token) as envd:
            await snapshots.bring_up(
                vm,
                envd,
                capsule.memory_mib,
                {**init_body(capsule), **(init_extra or {})},
                RESUME_DEADLINE_S,
            )
        timings["init"] = round(time.monotonic() - started, 3)
        return capsule, timings

    async def _create_from_template(
        self,
        template: Template,
        memory_mib: int | None,
        vcpus: int | None,
        network: str | None,
        auto_pause_s: int,
        labels: dict[str, object],
        capsule_id: str | None = None,
    ) -> Capsule:
        for asked, fixed, what in (
            (memory_mib, template.memory_mib, "memory (MiB)"),
            (vcpus, template.vcpus, "vCPUs"),
            (network, template.network, "network mode"),
        ):
            if asked is not None and asked != fixed:
                raise CapsuleError(
                    f"template {template.name!r} was taken with {what} {fixed}; a capsule made "
                    f"from it has the same (asked for {asked})"
                )
        snapshot = self.templates.snapshot(template)
        runtime = self.runtime(Path(template.image_dir))
        if runtime.accel != template.accel:
            raise CapsuleError(
                f"template {template.name!r} was taken under {template.accel}; this host runs "
                f"{runtime.accel}"
            )
        capsule = self._new_capsule(
            template.name,
            Path(template.image_dir),
            template.memory_mib,
            template.vcpus,
            template.network,
            auto_pause_s,
            runtime.accel,
            init_token=snapshot.envd_token,
            **labels,
        )
        if capsule_id is not None:
            capsule = capsule.with_(id=capsule_id)
        async with self.locks.hold(capsule.id):
            # recorded under the template lock: `template rm` sees this capsule as a user
            with self.templates.lock(shared=True):
                if self.templates.user(template.name) is None:
                    raise CapsuleError(f"template {template.name!r} was just removed")
                capsule = await self._register(capsule)
            self.event(
                capsule.id,
                "create",
                f"from template {template.name} ({template.memory_mib} MiB, "
                f"{template.vcpus} vCPU, {runtime.accel})",
            )
            started = time.monotonic()
            try:
                capsule, _ = await self._start_from(
                    capsule,
                    snapshot,
                    DiskFrom(overlay_on=Path(template.path) / snapshots.DISK),
                    f"template {template.name}",
                    # a recipe's ENV, WORKDIR, USER: envd's defaults for every later process
                    init_extra=template.process_defaults(),
                    share=self.clones,
                )
            except (SnapshotCorrupt, VMMError, EnvdError, OSError, CapsuleError) as exc:
                await self._kill(capsule)
                self.layout.cleanup_run_files(capsule.id)
                reason = f"create from template {template.name} failed: {exc}"
                self.event(capsule.id, "error", reason)
                self.save(capsule.with_(state=State.ERROR, reason=reason, pid=None))
                raise CapsuleError(reason) from exc
            return self._running(capsule, started, f"started from template {template.name}", "warm")

    # -- pause and resume (backend/capsules/pausing.py) ------------------------------------

    async def pause(self, capsule_id: str, prepare: bool = True) -> Snapshot:
        """Snapshot a running capsule to a new generation on disk and stop its VM.
        `prepare=False` skips the guest's page-cache drop (benchmarks show what it saves)."""
        return await pausing.pause(self, capsule_id, prepare)

    async def resume(self, capsule_id: str) -> Capsule:
        """Start a paused capsule again from its latest generation."""
        return await pausing.resume(self, capsule_id)

    async def resume_from_disk(self, capsule_id: str) -> Capsule:
        """Resume a paused capsule by booting its kernel on its latest snapshot's disk (E2B's
        filesystem-only pause): its files are there, its processes are not."""
        return await pausing.resume_from_disk(self, capsule_id)

    # -- templates and fork (backend/capsules/copying.py) ----------------------------------

    async def template_create(self, capsule_id: str, name: str) -> Template:
        """Save a running or paused capsule as template `name`. A running capsule is stopped
        only while its RAM and disk are copied; a paused one stays paused."""
        return await copying.save_template(self, capsule_id, name)

    async def template_remove(self, name: str) -> None:
        self.templates.remove(name, lambda: self.template_users(name))
        self.bases.forget(self.layout.template(name))

    async def fork(self, capsule_id: str, count: int = 1) -> list[Capsule]:
        """`count` new capsules, each with the source's memory and disk at one instant; the
        source keeps running (or stays paused). All start, or none is left."""
        return await copying.fork(self, capsule_id, count)

    # -- destroy ----------------------------------------------------------------------------

    async def destroy(self, capsule_id: str) -> None:
        async with self.locks.hold(capsule_id):
            capsule = self.get(capsule_id)
            await self._kill(capsule)
            self.layout.remove(capsule_id)
            await self.networks.teardown(capsule)
            self.store.delete(capsule_id)
            self.event(capsule_id, "destroy", "destroyed")
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
        require(capsule, Action.EXEC)
        self.touch(capsule_id)
        async with self.envd(capsule, timeout=timeout + 10) as envd:
            try:
                return await envd.exec(cmd, timeout=timeout)
            except EnvdError as exc:
                raise CapsuleError(f"exec in {capsule_id} failed: {exc}") from exc

    def touch(self, capsule_id: str) -> None:
        """Record activity (exec, PTY input): resets the auto-pause timer. One conditional
        update: it never writes over a state another operation committed meanwhile."""
        self.store.touch(capsule_id, time.time())


def _check_new_id(capsule_id: str, existing: Capsule | None) -> None:
    if not CAPSULE_ID_RULE.fullmatch(capsule_id):
        raise CapsuleError(f"invalid capsule id {capsule_id!r}: use cl- and 12 of a-z 0-9")
    if existing is not None:
        raise CapsuleError(f"a capsule {capsule_id!r} exists already")


def _check_size(memory_mib: int, vcpus: int) -> None:
    if not 64 <= memory_mib <= 65536:
        raise CapsuleError(f"memory must be 64..65536 MiB, not {memory_mib}")
    if not 1 <= vcpus <= 64:
        raise CapsuleError(f"vCPUs must be 1..64, not {vcpus}")
