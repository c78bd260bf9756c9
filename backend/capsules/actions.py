"""Which operation applies to a capsule in which state: the one rule the manager enforces and
the dashboard's keys, the command palette and the APIs read."""

from __future__ import annotations

import enum

from backend.capsules.errors import IllegalTransition
from backend.capsules.models import Capsule, State


class Action(enum.StrEnum):
    PAUSE = "pause"
    RESUME = "resume"
    DESTROY = "destroy"
    EXEC = "exec"
    """Run a command or open a shell (needs a running guest)."""
    TEMPLATE = "template"
    """Save the capsule as a template."""
    FORK = "fork"


TRANSITIONAL = frozenset({State.PENDING, State.PAUSING, State.RESUMING})
"""States an operation is in the middle of: nothing else applies until it ends."""

ALLOWED: dict[State, frozenset[Action]] = {
    State.PENDING: frozenset(),
    State.RUNNING: frozenset(
        {Action.PAUSE, Action.DESTROY, Action.EXEC, Action.TEMPLATE, Action.FORK}
    ),
    State.PAUSING: frozenset(),
    State.PAUSED: frozenset({Action.RESUME, Action.DESTROY, Action.TEMPLATE, Action.FORK}),
    State.RESUMING: frozenset(),
    State.ERROR: frozenset({Action.DESTROY}),
}


def allowed(state: State, action: Action) -> bool:
    return action in ALLOWED.get(state, frozenset())


def require(capsule: Capsule, action: Action) -> None:
    """Raise IllegalTransition, naming the capsule and its state, unless `action` applies."""
    if not allowed(capsule.state, action):
        raise IllegalTransition(f"cannot {action} {capsule.id}: it is {capsule.state}")
