"""Command palette (ctrl+p) entries: the actions of the keys, per capsule where they apply
(by the same rule as the keys: backend/capsules/actions.py). An entry posts the message its
key would; the app runs it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, cast

from textual.command import DiscoveryHit, Hit, Hits, Provider
from textual.message import Message

from backend.capsules.actions import Action, allowed
from tui import messages as msg
from tui.screens.main import MainScreen

if TYPE_CHECKING:
    from tui.context import Dashboard

Command = tuple[str, str, Callable[[], object]]

PER_CAPSULE: tuple[tuple[Action, str, str, type[msg.CapsuleRequest]], ...] = (
    (Action.PAUSE, "Pause", "snapshot to disk and stop (p)", msg.PauseRequested),
    (Action.RESUME, "Resume", "restore from its snapshot (r)", msg.ResumeRequested),
    (Action.TEMPLATE, "Save as template", "asks the name (t)", msg.TemplateRequested),
    (Action.FORK, "Fork", "asks how many (f)", msg.ForkRequested),
    (Action.DESTROY, "Destroy", "asks first (ctrl+d)", msg.DestroyRequested),
)


class CapsuleCommands(Provider):
    def _post(self, message: Message) -> None:
        self.app.post_message(message)

    def _commands(self) -> Iterator[Command]:
        app = cast("Dashboard", self.app)
        post = self._post
        yield (
            "New capsule",
            "from a template: memory and vCPUs (n)",
            partial(post, msg.CreateRequested()),
        )
        yield (
            "Templates",
            "saved templates: size, source, users; delete (T)",
            partial(post, msg.TemplatesRequested()),
        )
        yield (
            "Build capsule image",
            "build or rebuild the default image",
            partial(post, msg.ImageBuildRequested()),
        )
        main = self.screen if isinstance(self.screen, MainScreen) else None
        if main is not None:
            yield ("Sort by CPU", "guest CPU, again to flip (C)", partial(main.action_sort, "cpu"))
            yield (
                "Sort by memory",
                "guest memory used, again to flip (M)",
                partial(main.action_sort, "mem"),
            )
            yield ("Filter capsules", "by id, state or template (/)", main.action_filter)
        for capsule in app.backend.list_capsules():
            cid, state = capsule.id, capsule.state
            if main is not None and cid in main.operations:
                continue
            for action, name, help_text, request in PER_CAPSULE:
                if allowed(state, action):
                    yield (f"{name} {cid}", help_text, partial(post, request(cid)))
            yield (
                f"Details {cid}",
                f"{state.value}: charts, snapshots, events (enter)",
                partial(post, msg.DetailsRequested(cid)),
            )

    async def discover(self) -> Hits:
        for name, help_text, command in self._commands():
            yield DiscoveryHit(name, command, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, command in self._commands():
            if (score := matcher.match(name)) > 0:
                yield Hit(score, matcher.highlight(name), command, help=help_text)
