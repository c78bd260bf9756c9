"""What the agent API needs from the lifecycle engine, and its implementation on
CapsuleManager (tests substitute host envd processes for VMs through the same protocol)."""

from __future__ import annotations

from typing import Any, Protocol

from backend.capsules.envd_client import EnvdClient, EnvdError
from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule
from backend.image.builder import ImageBuilder


class Capsules(Protocol):
    def get(self, capsule_id: str) -> Capsule:
        """Raises CapsuleNotFound."""
        ...

    def list(self) -> list[Capsule]: ...

    def has_template(self, name: str) -> bool: ...

    async def create(self, *, template: str, network: str) -> Capsule:
        """Returns once envd in the capsule answers."""
        ...

    async def pause(self, capsule_id: str) -> None: ...

    async def resume(self, capsule_id: str) -> Capsule:
        """Returns once envd in the capsule answers."""
        ...

    async def destroy(self, capsule_id: str) -> None: ...

    async def update_extra(self, capsule_id: str, key: str, value: dict[str, Any]) -> Capsule:
        """Set ``extra[key]`` without racing a lifecycle operation on the same capsule."""
        ...

    def touch(self, capsule_id: str) -> None: ...

    def note(self, capsule_id: str, kind: str, message: str) -> None:
        """An entry in the capsule's event log (shown by the dashboard)."""
        ...

    async def set_env(self, capsule: Capsule, env: dict[str, str]) -> None:
        """Environment variables for every later process in the capsule."""
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
        return ImageBuilder(self.manager.paths, name).installed() is not None

    async def create(self, *, template: str, network: str) -> Capsule:
        return await self.manager.create(template=template, network=network)

    async def pause(self, capsule_id: str) -> None:
        await self.manager.pause(capsule_id)

    async def resume(self, capsule_id: str) -> Capsule:
        return await self.manager.resume(capsule_id)

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

    async def set_env(self, capsule: Capsule, env: dict[str, str]) -> None:
        try:
            async with EnvdClient(capsule.envd_url, capsule.access_token) as envd:
                await envd.init(envVars=env)
        except EnvdError as exc:
            raise CapsuleError(f"setting the environment of {capsule.id} failed: {exc}") from exc

    async def metrics(self, capsule: Capsule) -> dict[str, Any] | None:
        try:
            async with EnvdClient(capsule.envd_url, capsule.access_token) as envd:
                return await envd.metrics(timeout=2.0)
        except EnvdError:
            return None
