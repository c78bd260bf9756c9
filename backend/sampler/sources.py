"""Where the sampler learns what to poll: the TargetSource protocol and its manager adapter."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Protocol

from backend.capsules.errors import CapsuleError
from backend.capsules.models import State
from backend.runtime.base import BalloonStats
from backend.sampler.models import Target

if TYPE_CHECKING:
    from backend.capsules.manager import CapsuleManager

log = logging.getLogger("wrenn.sampler")


class TargetSource(Protocol):
    def targets(self) -> list[Target]:
        """The running capsules; called once per tick, so it must be cheap and not block."""
        ...

    async def balloon_stats(self, capsule_id: str) -> BalloonStats | None: ...


class ManagerSource:
    """Running capsules as the capsule manager records them."""

    def __init__(self, manager: CapsuleManager) -> None:
        self._manager = manager

    def targets(self) -> list[Target]:
        return [
            Target(capsule_id=c.id, envd_url=c.envd_url, token=c.access_token or None, pid=c.pid)
            for c in self._manager.list_capsules()
            if c.state == State.RUNNING
        ]

    async def balloon_stats(self, capsule_id: str) -> BalloonStats | None:
        try:
            return await self._manager.balloon_stats(capsule_id)
        except CapsuleError as exc:
            # Destroyed between the tick that listed it and this call: nothing to report.
            log.debug("no balloon stats for %s: %s", capsule_id, exc)
            return None


class StaticSource:
    """A fixed list of targets without balloon statistics (the CLI's live samples, benches)."""

    def __init__(self, targets: list[Target]) -> None:
        self._targets = list(targets)

    def targets(self) -> list[Target]:
        return list(self._targets)

    async def balloon_stats(self, capsule_id: str) -> BalloonStats | None:
        return None
