"""Command palette (ctrl+p) entries: the actions of the keys, per capsule where they apply."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider

from backend.capsules.models import State
from tui.screens.main import MainScreen

if TYPE_CHECKING:
    from tui.app import WrennApp

Command = tuple[str, str, Callable[[], object]]


class CapsuleCommands(Provider):
    def _commands(self) -> Iterator[Command]:
        app = cast("WrennApp", self.app)
        yield ("New capsule", "create a capsule: memory and vCPUs (n)", app.request_create)
        yield ("Build capsule image", "build or rebuild the default image", app.offer_image_build)
        main = self.screen if isinstance(self.screen, MainScreen) else None
        if main is not None:
            yield ("Sort by CPU", "guest CPU, again to flip (C)", partial(main.action_sort, "cpu"))
            yield (
                "Sort by memory",
                "guest memory used, again to flip (M)",
                partial(main.action_sort, "mem"),
            )
            yield ("Filter capsules", "by id, state or template (/)", main.action_filter)
        for capsule in app.manager.list_capsules():
            cid, state = capsule.id, capsule.state
            if cid in app.operations:
                continue
            if state == State.RUNNING:
                yield (
                    f"Pause {cid}",
                    "snapshot to disk and stop (p)",
                    partial(app.pause_capsule, cid),
                )
            if state == State.PAUSED:
                yield (
                    f"Resume {cid}",
                    "restore from its snapshot (r)",
                    partial(app.resume_capsule, cid),
                )
            if state not in (State.PENDING, State.PAUSING, State.RESUMING):
                yield (f"Destroy {cid}", "asks first (ctrl+d)", partial(app.request_destroy, cid))
            yield (
                f"Details {cid}",
                f"{state.value}: charts, snapshots, events (enter)",
                partial(app.show_details, cid),
            )

    async def discover(self) -> Hits:
        for name, help_text, command in self._commands():
            yield DiscoveryHit(name, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, command in self._commands():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), command, help=help_text)
