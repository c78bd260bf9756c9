"""What the agent API needs from the lifecycle engine, and its implementation on
CapsuleManager (tests substitute host envd processes for VMs through the same protocol)."""

from __future__ import annotations

import builtins
from typing import Any, Protocol

from backend.capsules.envd_client import EnvdClient, EnvdError
from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule
from backend.capsules.templates import Template


class Capsules(Protocol):
    def get(self, capsule_id: str) -> Capsule:
        """Raises CapsuleNotFound."""
        ...

    def list(self) -> list[Capsule]: ...

    def has_template(self, name: str) -> bool:
        """A built-in template (an image) or a user template (a saved capsule)."""
        ...

    async def create(self, *, template: str, network: str | None) -> Capsule:
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


class ManagerCapsules:
    def __init__(self, manager: CapsuleManager) -> None:
        self.manager = manager

    def get(self, capsule_id: str) -> Capsule:
        return self.manager.get(capsule_id)

    def list(self) -> list[Capsule]:
        return self.manager.list_capsules()

    def has_template(self, name: str) -> bool:
        return (self.manager.templates.user(name) or self.manager.templates.image(name)) is not None

    async def create(self, *, template: str, network: str | None) -> Capsule:
        return await self.manager.create(template=template, network=network)

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
