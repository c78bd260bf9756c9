"""Issue 19: the unmodified Wrenn SDK (``wrenn==0.3.0`` from PyPI, in its own Python 3.13
venv) drives real capsules through ``wrenn-tui``'s agent API, sync and async; the dashboard's
state (the same database, the same event log) and the SDK's agree both ways."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from backend.api.capsules import ManagerCapsules
from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from tests.e2b.conftest import ServerThread

from .conftest import run_sdk

pytestmark = pytest.mark.vm


def test_the_sync_sdk_drives_every_call(
    wrenn_api: ServerThread, sdk_python: Path, paths: Paths
) -> None:
    out = run_sdk(sdk_python, wrenn_api.key, wrenn_api.url, "lifecycle")
    assert "paused" in out["run_paused"] and "resume it first" in out["run_paused"]
    assert "it is paused" in out["pause_paused"]
    assert "exists" in out["snapshot_exists"]
    assert "used by 1 capsule" in out["delete_in_use"]
    # What the SDK did is in the event log the dashboard shows, and the capsule is gone.
    store = Store(paths.database)
    try:
        kinds = [e.kind for e in store.events(out["capsule_id"], 200)]
        for kind in ("create", "wrenn", "running", "paused", "template", "destroy"):
            assert kind in kinds, kinds
        assert store.get(out["capsule_id"]) is None
    finally:
        store.close()
    print("steps", out["steps"])


def test_the_async_sdk_drives_capsules(wrenn_api: ServerThread, sdk_python: Path) -> None:
    out = run_sdk(sdk_python, wrenn_api.key, wrenn_api.url, "lifecycle-async")
    assert out["capsule_id"].startswith("cl-")


def test_sdk_and_dashboard_see_the_same_capsules(wrenn_api: ServerThread, sdk_python: Path) -> None:
    """Created through the API: in the manager's list (the dashboard's table, `capsule
    list`); paused by the manager (the dashboard's `p`): paused in the SDK."""
    with wrenn_api.client() as client:
        created = client.post("/v1/capsules", json={}, timeout=120)
        assert created.status_code == 201, created.text
        capsule_id = created.json()["id"]
        capsules = wrenn_api.capsules
        assert isinstance(capsules, ManagerCapsules)
        manager = capsules.manager
        assert capsule_id in {c.id for c in manager.list_capsules()}
        deadline = 60
        while manager.get(capsule_id).state != State.RUNNING and deadline > 0:
            wrenn_api.call(asyncio.sleep(1))
            deadline -= 1
        wrenn_api.call(manager.pause(capsule_id))
        status = run_sdk(sdk_python, wrenn_api.key, wrenn_api.url, "status", capsule_id)
        assert status["status"] == "paused"
        assert client.delete(f"/v1/capsules/{capsule_id}").status_code == 204
        assert capsule_id not in {c.id for c in manager.list_capsules()}
