"""The dashboard's one port into the backend (as backend/api/capsules.py is the API's): what
tui/ needs from the capsule manager, the image builder and the accelerator probe, and nothing
else. tui/ calls the backend only through this port (plus the sampler, and the data types of
backend/capsules); it imports nothing from backend/runtime or backend/image
(tests/unit/test_boundary.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend.capsules.hostcost import HostCost, host_costs
from backend.capsules.manager import DEFAULT_MEMORY_MIB, CapsuleManager
from backend.capsules.models import Capsule, Event, Snapshot
from backend.capsules.templates import MAX_FORK, Template
from backend.capsules.usage import DiskUsage, Reclaimable, UsageScanner
from backend.config import Paths
from backend.image.builder import ImageBuilder
from backend.image.errors import ImageBuildError
from backend.recipes.status import BuildStatus, active_builds
from backend.runtime.accel import probe_accel
from backend.runtime.network import MODES

__all__ = [
    "MAX_FORK",
    "BuildStatus",
    "DiskUsage",
    "ImageBuildFailed",
    "ManagerPort",
    "Reclaimable",
    "TemplateInfo",
]

NETWORK_MODES: tuple[str, ...] = tuple(MODES)
DEFAULT_TEMPLATE = "default"


class ImageBuildFailed(Exception):
    """The image build stopped; the message says why and what to do."""


@dataclass(frozen=True)
class TemplateInfo:
    """One row of the templates view and one choice of the create form."""

    name: str
    builtin: bool
    source: str
    created_at: float
    memory_mib: int
    """0 for an image (any size)."""
    vcpus: int
    network: str
    allocated: int
    users: int
    """Capsules made from it (running, paused or failed)."""

    @classmethod
    def of(cls, template: Template, users: int) -> TemplateInfo:
        return cls(
            name=template.name,
            builtin=template.builtin,
            source=template.source,
            created_at=template.created_at,
            memory_mib=template.memory_mib,
            vcpus=template.vcpus,
            network=template.network,
            allocated=template.allocated,
            users=users,
        )


class ManagerPort:
    """The port on a real CapsuleManager."""

    def __init__(self, manager: CapsuleManager) -> None:
        self.manager = manager
        self.paths: Paths = manager.paths
        self.network_modes = NETWORK_MODES
        self.default_memory_mib = DEFAULT_MEMORY_MIB
        self._usage = UsageScanner(manager.paths, manager.layout, manager.store)

    # -- reading ------------------------------------------------------------------------------

    def list_capsules(self) -> list[Capsule]:
        return self.manager.list_capsules()

    def get(self, capsule_id: str) -> Capsule:
        return self.manager.get(capsule_id)

    def snapshots(self, capsule_id: str) -> list[Snapshot]:
        return self.manager.snapshots(capsule_id)

    def events(self, capsule_id: str, limit: int) -> list[Event]:
        return self.manager.events(capsule_id, limit)

    def console_log(self, capsule_id: str) -> Path:
        return self.manager.layout.console_log(capsule_id)

    def touch(self, capsule_id: str) -> None:
        self.manager.touch(capsule_id)

    def subscribe(self, listener: Callable[[Capsule], None]) -> Callable[[], None]:
        return self.manager.subscribe(listener)

    def host_costs(self, own: Callable[[Capsule], int | None] | None = None) -> dict[str, HostCost]:
        """What each running capsule costs the host's memory (backend/capsules/hostcost.py);
        `own`: QEMU's own memory as the sampler last read it."""
        return host_costs(self.manager, self.manager.list_capsules(), own)

    def builds(self) -> list[BuildStatus]:
        """Recipe builds running now, started by any process (the CLI's included)."""
        return active_builds(self.manager.layout.work)

    def templates(self) -> list[TemplateInfo]:
        users: dict[str, int] = {}
        for capsule in self.manager.list_capsules():
            users[capsule.template] = users.get(capsule.template, 0) + 1
        return [TemplateInfo.of(t, users.get(t.name, 0)) for t in self.manager.list_templates()]

    # -- capsule operations -------------------------------------------------------------------

    async def start(self) -> list[Capsule]:
        return await self.manager.start()

    async def close(self) -> None:
        await self.manager.close()

    async def create(
        self, template: str, memory_mib: int | None, vcpus: int | None, network: str | None
    ) -> Capsule:
        """Sizes None: the template's own (a saved template has one)."""
        return await self.manager.create(
            template=template, memory_mib=memory_mib, vcpus=vcpus, network=network
        )

    async def pause(self, capsule_id: str) -> Snapshot:
        return await self.manager.pause(capsule_id)

    async def resume(self, capsule_id: str) -> Capsule:
        return await self.manager.resume(capsule_id)

    async def destroy(self, capsule_id: str) -> None:
        await self.manager.destroy(capsule_id)

    async def template_create(self, capsule_id: str, name: str) -> TemplateInfo:
        template = await self.manager.template_create(capsule_id, name)
        return TemplateInfo.of(template, 0)

    async def template_remove(self, name: str) -> None:
        await self.manager.template_remove(name)

    async def fork(self, capsule_id: str, count: int) -> list[Capsule]:
        return await self.manager.fork(capsule_id, count)

    # -- the image and the host -------------------------------------------------------------

    async def disk_usage(self) -> DiskUsage:
        """Walks the state, image and cache trees (in a thread)."""
        return await asyncio.to_thread(self._usage.scan, self._usage.states())

    async def free_space(self) -> list[Reclaimable]:
        """Remove orphan RAM files, half-written snapshots and abandoned work dirs; never
        what a capsule or template needs (backend/capsules/usage.py)."""
        return await self._usage.free(self.manager.locks)

    def image_present(self) -> bool:
        return ImageBuilder(self.paths).installed() is not None

    def build_image(self, progress: Callable[[str, float], None]) -> None:
        """Blocks (run it in a thread); raises ImageBuildFailed."""
        try:
            ImageBuilder(self.paths).build(progress=progress)
        except (ImageBuildError, OSError) as exc:
            raise ImageBuildFailed(str(exc)) from exc

    async def accel(self) -> str:
        """KVM or TCG, as the manager will find it (same kernel argument, so the manager's
        later probe is answered from the cache)."""
        status = await asyncio.to_thread(ImageBuilder(self.paths).status)
        kernel = status.path.resolve() / "vmlinux" if status.present else None
        return (await asyncio.to_thread(probe_accel, kernel)).accel
