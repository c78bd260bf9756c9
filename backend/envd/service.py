"""envd's parts wired together, plus the operations that span several of them.

Free of any web framework: app.py maps HTTP and WebSocket requests onto this object.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from typing import Any

from . import __version__
from .config import Config
from .files import FileService
from .guest import GuestKernel
from .metadata import IdentityPublisher, Metadata, MetadataPoller, parse_source
from .metrics import CpuSampler, ProcReader, disk_usage
from .paths import PathResolver
from .processes import ProcessManager
from .pty_sessions import PtyManager
from .reclaimer import Reclaimer
from .spawn import Launcher
from .state import InitRequest, RuntimeState
from .users import Accounts

log = logging.getLogger("envd")


class Envd:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self.state = RuntimeState(
            reclaim_threshold=config.reclaim_threshold,
            snapshot_hold_timeout=config.snapshot_hold_timeout,
            # In a capsule the host's metadata brings the first token; until it does, envd
            # answers nothing but /health (never open to whoever connects first).
            token_required=bool(config.metadata) and not config.host_mode,
        )
        self.resolver = PathResolver(config.root)
        self.accounts = Accounts(host_mode=config.host_mode)
        self.kernel = GuestKernel(host_mode=config.host_mode, proc=config.proc_path)
        self.proc = ProcReader(config.proc_path)
        self.cpu = CpuSampler(self.proc, interval=config.cpu_interval)
        self.reclaimer = Reclaimer(
            self.state, self.kernel, self.proc, interval=config.reclaim_interval
        )
        self.identity = IdentityPublisher(config.run_dir)
        self.metadata: MetadataPoller | None = None
        if config.metadata:
            self.metadata = MetadataPoller(
                parse_source(config.metadata), self.apply_metadata, config.metadata_interval
            )
        self.launcher = Launcher(self.state, self.accounts, self.resolver)
        self.files = FileService(self.resolver, self.accounts)
        self.processes = ProcessManager(
            self.launcher, self.resolver, buffer_bytes=config.process_buffer_bytes
        )
        self.ptys = PtyManager(self.launcher, self.resolver, ring_bytes=config.pty_buffer_bytes)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.config.root is not None:
            # The host stand-in for the user's home, where relative paths and shells start.
            home = self.resolver.to_real(self.accounts.current.home, "/")
            home.mkdir(parents=True, exist_ok=True)
        try:
            self.cpu.sample()
        except OSError as exc:
            log.warning("cannot read CPU statistics: %s", exc)
        self._spawn(self.cpu.run(), "cpu-sampler")
        self._spawn(self.reclaimer.run(), "reclaimer")
        if self.metadata is not None:
            self._spawn(self.metadata.run(), "metadata")
        log.info(
            "envd %s ready (%s mode, root %s)",
            __version__,
            "host" if self.config.host_mode else "guest",
            self.config.fs_root,
        )

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that swallows its cancellation must not keep envd from exiting.
            _, stuck = await asyncio.wait(self._tasks, timeout=2)
            for task in stuck:
                log.warning("background task %s did not stop", task.get_name())
        self._tasks.clear()
        await self.processes.shutdown()
        await self.ptys.shutdown()

    # -- identity ---------------------------------------------------------------------------

    def apply_metadata(self, metadata: Metadata) -> None:
        if metadata.access_token and self.state.access_token is None:
            # A fresh boot: the token the host started this VM with. A restored envd keeps
            # the one it holds until the host's /init (which must present it) replaces it.
            log.info("access token taken from the host's metadata")
            self.state.set_token(metadata.access_token)
        self.set_identity(metadata.instance_id, metadata.template_id)

    def set_identity(self, sandbox_id: str | None, template_id: str | None) -> None:
        # Missing values never erase known ones: a half-filled answer is not a new identity.
        if sandbox_id and sandbox_id != self.state.sandbox_id:
            log.info("sandbox id is now %s", sandbox_id)
            self.state.sandbox_id = sandbox_id
        if template_id and template_id != self.state.template_id:
            log.info("template id is now %s", template_id)
            self.state.template_id = template_id
        self.identity.publish(self.state.sandbox_id, self.state.template_id)

    # -- endpoints spanning several parts ----------------------------------------------------

    def version(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "python": platform.python_version(),
            "mode": "host" if self.config.host_mode else "guest",
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    def metrics(self) -> dict[str, Any]:
        mem = self.proc.meminfo()
        disk = disk_usage(self.config.fs_root)
        return {
            "ts": time.time(),
            "cpu_count": self.cpu.cpu_count,
            "cpu_used_pct": self.cpu.cpu_used_pct,
            **mem.figures(),
            "disk_used": disk.used,
            "disk_total": disk.total,
            "reclaims": self.reclaimer.reclaims,
            "reclaim_threshold": self.state.reclaim_threshold,
            "snapshot_in_progress": self.state.snapshot_in_progress,
            "processes": sum(1 for p in self.processes.list() if p.alive),
            "ptys": sum(1 for s in self.ptys.list() if s.alive),
        }

    async def init(self, request: InitRequest) -> dict[str, Any]:
        if request.default_user is not None:
            # Fails with 400 for a user the guest does not have (ignored in host mode).
            self.accounts.lookup(request.default_user)
        if request.env_vars is not None:
            self.state.env_vars.update(request.env_vars)
        if request.default_user is not None:
            self.state.default_user = request.default_user
        if request.default_workdir is not None:
            self.state.default_workdir = request.default_workdir
        if request.reclaim_threshold is not None:
            self.state.reclaim_threshold = request.reclaim_threshold
        clock_set = False
        if request.timestamp is not None:
            clock_set = self.kernel.set_clock(request.timestamp)
        entropy_added = False
        if request.entropy:
            entropy_added = self.kernel.add_entropy(request.entropy)
        if request.instance_id or request.template_id:
            self.set_identity(request.instance_id, request.template_id)
        if request.access_token is not None:
            # Last: everything that can refuse the request has passed; streams opened under
            # the old token end now (the answer to this request still goes out).
            self.state.set_token(request.access_token)
        # /init follows every boot and every resume, so a pending snapshot is over.
        self.state.end_snapshot()
        self.state.init_count += 1
        self.state.last_init_at = time.time()
        return {
            "ok": True,
            "version": __version__,
            "clock_set": clock_set,
            "entropy_added": entropy_added,
            "snapshot_in_progress": False,
            "sandbox_id": self.state.sandbox_id,
            "template_id": self.state.template_id,
        }

    async def prepare_snapshot(self) -> dict[str, Any]:
        self.state.begin_snapshot()
        async with self.reclaimer.lock:
            before = self.proc.meminfo()
            await asyncio.to_thread(self.kernel.sync)
            dropped = await asyncio.to_thread(self.kernel.drop_page_cache)
            after = self.proc.meminfo()
        keys = ("mem_used", "mem_cache", "mem_available")
        before_figures = before.figures()
        after_figures = after.figures()
        return {
            "ok": True,
            "snapshot_in_progress": True,
            "dropped": dropped,
            "before": {k: before_figures[k] for k in keys},
            "after": {k: after_figures[k] for k in keys},
        }

    def abort_snapshot(self) -> dict[str, Any]:
        self.state.end_snapshot()
        return {"ok": True, "snapshot_in_progress": False}
