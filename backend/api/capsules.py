"""What the agent APIs (E2B's in rest.py, Wrenn's in wrenn/) need from the lifecycle engine,
and its implementation on CapsuleManager (the E2B tests substitute host envd processes for VMs
through the same protocol; they use only the part E2B's routes call)."""

from __future__ import annotations

import builtins
from typing import Any, Protocol

from backend.capsules.envd_client import EnvdClient, EnvdError
from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, Event
from backend.capsules.templates import Template
from backend.sampler import SERIES, Sampler


class Capsules(Protocol):
    def get(self, capsule_id: str) -> Capsule:
        """Raises CapsuleNotFound."""
        ...

    def list(self) -> list[Capsule]: ...

    def has_template(self, name: str) -> bool:
        """A built-in template (an image) or a user template (a saved capsule)."""
        ...

    async def create(
        self,
        *,
        template: str,
        network: str | None,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        auto_pause_s: int = 0,
        capsule_id: str | None = None,
    ) -> Capsule:
        """Returns once envd in the capsule answers. `network` None: the template's own mode
        (a user template's), or `none`."""
        ...

    def snapshots(self) -> builtins.list[Template]:
        """The user templates (E2B calls them snapshots)."""
        ...

    async def snapshot(self, capsule_id: str, name: str) -> Template:
        """Save a running or paused capsule as template `name` (TemplateExists if taken)."""
        ...

    async def delete_snapshot(self, name: str) -> None:
        """TemplateNotFound, TemplateInUse, or CapsuleError for a built-in template."""
        ...

    async def fork(self, capsule_id: str, count: int) -> builtins.list[Capsule]: ...

    async def pause(self, capsule_id: str) -> None: ...

    async def resume(self, capsule_id: str) -> Capsule:
        """Returns once envd in the capsule answers."""
        ...

    async def resume_from_disk(self, capsule_id: str) -> Capsule:
        """Boot a paused capsule on its paused disk (its memory unused); once envd answers."""
        ...

    async def destroy(self, capsule_id: str) -> None: ...

    async def update_extra(self, capsule_id: str, key: str, value: dict[str, Any]) -> Capsule:
        """Set ``extra[key]`` without racing a lifecycle operation on the same capsule."""
        ...

    def touch(self, capsule_id: str) -> None: ...

    def note(self, capsule_id: str, kind: str, message: str) -> None:
        """An entry in the capsule's event log (shown by the dashboard)."""
        ...

    async def init_guest(self, capsule: Capsule, fields: dict[str, Any]) -> None:
        """Fields of envd's /init (envVars, defaultUser, defaultWorkdir) for every later
        process in the capsule."""
        ...

    async def metrics(self, capsule: Capsule) -> dict[str, Any] | None: ...

    # -- what Wrenn's API uses besides -------------------------------------------------------

    def list_templates(self) -> builtins.list[Template]: ...

    async def template_create(self, capsule_id: str, name: str) -> Template: ...

    async def template_remove(self, name: str) -> None: ...

    def events(self, limit: int) -> builtins.list[Event]:
        """The most recent entries of the event log (all capsules), oldest first."""
        ...

    def history(
        self, capsule_id: str, series: str, window_s: float
    ) -> builtins.list[tuple[float, float]]:
        """(ts, value) of one sampler series (backend/sampler/models.py SERIES)."""
        ...

    def disk_allocated(self, capsule_id: str) -> int | None:
        """Bytes the capsule's disk overlay takes on the host (None: no disk now)."""
        ...


class ManagerCapsules:
    def __init__(self, manager: CapsuleManager, sampler: Sampler | None = None) -> None:
        """`sampler`: the running sampler whose history Wrenn's metrics routes read
        (without one they have no history to show)."""
        self.manager = manager
        self.sampler = sampler

    def get(self, capsule_id: str) -> Capsule:
        return self.manager.get(capsule_id)

    def list(self) -> list[Capsule]:
        return self.manager.list_capsules()

    def has_template(self, name: str) -> bool:
        return (self.manager.templates.user(name) or self.manager.templates.image(name)) is not None

    async def create(
        self,
        *,
        template: str,
        network: str | None,
        memory_mib: int | None = None,
        vcpus: int | None = None,
        auto_pause_s: int = 0,
        capsule_id: str | None = None,
    ) -> Capsule:
        return await self.manager.create(
            template=template,
            network=network,
            memory_mib=memory_mib,
            vcpus=vcpus,
            auto_pause_s=auto_pause_s,
            capsule_id=capsule_id,
        )

    def snapshots(self) -> builtins.list[Template]:
        return [t for t in self.manager.list_templates() if not t.builtin]

    async def snapshot(self, capsule_id: str, name: str) -> Template:
        return await self.manager.template_create(capsule_id, name)

    async def delete_snapshot(self, name: str) -> None:
        await self.manager.template_remove(name)

    async def fork(self, capsule_id: str, count: int) -> builtins.list[Capsule]:
        return await self.manager.fork(capsule_id, count)

    async def pause(self, capsule_id: str) -> None:
        await self.manager.pause(capsule_id)

    async def resume(self, capsule_id: str) -> Capsule:
        return await self.manager.resume(capsule_id)

    async def resume_from_disk(self, capsule_id: str) -> Capsule:
        return await self.manager.resume_from_disk(capsule_id)

    async def destroy(self, capsule_id: str) -> None:
        await self.manager.destroy(capsule_id)

    async def update_extra(self, capsule_id: str, key: str, value: dict[str, Any]) -> Capsule:
        # Under the capsule's lock: pause and resume save a copy they read under it too.
        async with self.manager.locks.hold(capsule_id):
            capsule = self.manager.get(capsule_id)
            updated = capsule.with_(extra={**capsule.extra, key: value})
            self.manager.store.put(updated)
            return updated

    def touch(self, capsule_id: str) -> None:
        self.manager.touch(capsule_id)

    def note(self, capsule_id: str, kind: str, message: str) -> None:
        self.manager.store.add_event(capsule_id, kind, message)

    async def init_guest(self, capsule: Capsule, fields: dict[str, Any]) -> None:
        try:
            async with EnvdClient(capsule.envd_url, capsule.access_token) as envd:
                await envd.init(**fields)
        except EnvdError as exc:
            raise CapsuleError(f"setting up the guest of {capsule.id} failed: {exc}") from exc

    async def metrics(self, capsule: Capsule) -> dict[str, Any] | None:
        try:
            async with EnvdClient(capsule.envd_url, capsule.access_token) as envd:
                return await envd.metrics(timeout=2.0)
        except EnvdError:
            return None

    def list_templates(self) -> builtins.list[Template]:
        return self.manager.list_templates()

    async def template_create(self, capsule_id: str, name: str) -> Template:
        return await self.manager.template_create(capsule_id, name)

    async def template_remove(self, name: str) -> None:
        await self.manager.template_remove(name)

    def events(self, limit: int) -> builtins.list[Event]:
        return self.manager.events(None, limit)

    def history(
        self, capsule_id: str, series: str, window_s: float
    ) -> builtins.list[tuple[float, float]]:
        if series not in SERIES:
            raise ValueError(f"unknown series {series!r}")
        if self.sampler is None:
            return []
        return self.sampler.history(capsule_id, series, window_s)

    def disk_allocated(self, capsule_id: str) -> int | None:
        try:
            return self.manager.layout.disk(capsule_id).stat().st_blocks * 512
        except OSError:
            return None
