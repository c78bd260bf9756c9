"""The state database's capsule list is kept between reads; every way the rows can change must
still show on the next read: writes here, commits by another process, a rolled-back change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from backend.capsules.models import Capsule, State
from backend.capsules.store import Store

REPO = Path(__file__).resolve().parents[2]


def capsule(index: int, state: State = State.RUNNING) -> Capsule:
    return Capsule(
        id=f"cl-store{index:07d}",
        state=state,
        template="default",
        image_dir="/nonexistent",
        memory_mib=256,
        vcpus=1,
        created_at=1_700_000_000.0 + index,
        host_port=1,
        access_token="",
    )


def states(store: Store) -> list[str]:
    return [c.state.value for c in store.list_capsules()]


def test_writes_on_this_connection_show_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.put(capsule(0))
    assert states(store) == ["running"]
    assert store.list_capsules() == store.list_capsules()
    store.put(capsule(0, State.PAUSED))
    assert states(store) == ["paused"]
    store.put(capsule(1))
    assert states(store) == ["paused", "running"]
    store.delete(capsule(0).id)
    assert [c.id for c in store.list_capsules()] == [capsule(1).id]
    # The list handed out is the caller's: changing it changes nothing here.
    store.list_capsules().clear()
    assert len(store.list_capsules()) == 1
    store.close()


def test_a_commit_by_another_process_shows_on_the_next_read(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.put(capsule(0))
    assert states(store) == ["running"]
    code = (
        "import sys; from pathlib import Path; from backend.capsules.store import Store; "
        "from tests.unit.test_store import capsule; from backend.capsules.models import State; "
        "s = Store(Path(sys.argv[1])); s.put(capsule(0, State.PAUSED)); s.close()"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "state.db")], cwd=REPO, check=True)
    assert states(store) == ["paused"]
    store.close()


def test_a_rolled_back_change_is_not_kept(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.put(capsule(0))
    assert states(store) == ["running"]
    with pytest.raises(RuntimeError), store.transaction():
        store.put(capsule(0, State.ERROR))
        assert states(store) == ["error"]  # inside: the transaction's own view
        raise RuntimeError("abandon")
    assert states(store) == ["running"]
    store.close()


def test_reads_are_served_without_decoding_again(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    for index in range(120):
        store.put(capsule(index))
    first = store.list_capsules()
    store.put_metrics(capsule(0).id, "{}")  # the sampler's writes leave the capsules alone
    store.add_event(capsule(0).id, "test", "an event")
    again = store.list_capsules()
    assert again == first and again is not first
    assert all(a is b for a, b in zip(again, first, strict=True))  # the same decoded rows
    store.close()
