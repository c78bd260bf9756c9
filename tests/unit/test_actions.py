"""The state -> allowed operations rule."""

from __future__ import annotations

import pytest

from backend.capsules.actions import ALLOWED, Action, allowed, require
from backend.capsules.errors import IllegalTransition
from backend.capsules.models import Capsule, State


def capsule(state: State) -> Capsule:
    return Capsule(
        id="cl-test",
        state=state,
        template="default",
        image_dir="/nonexistent",
        memory_mib=256,
        vcpus=1,
        created_at=0.0,
        host_port=1,
        access_token="t",
    )


def test_only_a_running_capsule_pauses_and_only_a_paused_one_resumes() -> None:
    assert [s for s in State if allowed(s, Action.PAUSE)] == [State.RUNNING]
    assert [s for s in State if allowed(s, Action.RESUME)] == [State.PAUSED]
    assert [s for s in State if allowed(s, Action.EXEC)] == [State.RUNNING]


def test_nothing_applies_while_an_operation_runs() -> None:
    for state in (State.PENDING, State.PAUSING, State.RESUMING):
        assert ALLOWED[state] == frozenset()


def test_a_failed_capsule_can_only_be_destroyed() -> None:
    assert ALLOWED[State.ERROR] == frozenset({Action.DESTROY})


def test_require_names_the_capsule_and_its_state() -> None:
    require(capsule(State.RUNNING), Action.PAUSE)
    with pytest.raises(IllegalTransition, match="cannot resume cl-test: it is running"):
        require(capsule(State.RUNNING), Action.RESUME)
