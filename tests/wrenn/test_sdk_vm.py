"""Issue 19: the unmodified Wrenn SDK (``wrenn==0.3.0`` from PyPI, in its own Python 3.13
venv) drives real capsules through ``wrenn-tui``'s agent API, sync and async; the dashboard's
state (the same database, the same event log) and the SDK's agree both ways."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from backend.envd import protocol as wire
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


def test_the_async_sdk_drives_capsules(
    wrenn_api: ServerThread, sdk_python: Path, paths: Paths
) -> None:
    out = run_sdk(sdk_python, wrenn_api.key, wrenn_api.url, "lifecycle-async")
    store = Store(paths.database)
    try:
        kinds = [e.kind for e in store.events(out["capsule_id"], 200)]
        assert kinds.count("running") >= 2 and "paused" in kinds, kinds  # create, resume
    finally:
        store.close()


def test_sdk_and_dashboard_see_the_same_capsules(
    wrenn_api: ServerThread, sdk_python: Path, paths: Paths
) -> None:
    """Created through the API: in `wrenn-tui capsule list` and in another manager (the
    dashboard's); paused there (the dashboard's `p`): paused in the SDK."""
    with wrenn_api.client() as client:
        created = client.post("/v1/capsules", json={}, timeout=120)
        assert created.status_code == 201, created.text
        capsule_id = created.json()["id"]
        env = {
            **os.environ,
            "WRENN_STATE_DIR": str(paths.state),
            "WRENN_CONFIG_DIR": str(paths.config),
        }
        listed = subprocess.run(
            [str(Path(sys.executable).with_name("wrenn-tui")), "capsule", "list", "--json"],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert capsule_id in {c["id"] for c in json.loads(listed.stdout)}

        async def dashboard_pause() -> State:
            dashboard = CapsuleManager(paths)
            try:
                for _ in range(120):
                    if dashboard.get(capsule_id).state == State.RUNNING:
                        break
                    await asyncio.sleep(1)
                await dashboard.pause(capsule_id)
                return dashboard.get(capsule_id).state
            finally:
                await dashboard.close()

        assert asyncio.run(dashboard_pause()) == State.PAUSED
        status = run_sdk(sdk_python, wrenn_api.key, wrenn_api.url, "status", capsule_id)
        assert status["status"] == "paused"
        assert client.delete(f"/v1/capsules/{capsule_id}").status_code == 204
        assert client.get(f"/v1/capsules/{capsule_id}").status_code == 404


def test_a_dashboard_terminal_is_reached_by_tag(
    wrenn_api: ServerThread, sdk_python: Path, paths: Paths
) -> None:
    """The dashboard's shell pane starts an envd /pty session with a tag; the SDK's
    pty_connect(tag) drives it too, and leaving it leaves the session to the pane."""
    with wrenn_api.client() as client:
        created = client.post("/v1/capsules", json={}, timeout=120)
        assert created.status_code == 201, created.text
        capsule_id = created.json()["id"]
        for _ in range(120):
            if client.get(f"/v1/capsules/{capsule_id}").json()["status"] == "running":
                break
            time.sleep(1)
    store = Store(paths.database)
    capsule = store.get(capsule_id)
    store.close()
    assert capsule is not None
    headers = wire.auth_headers(capsule.access_token)
    with ws_connect(wire.pty_ws_url(capsule.envd_url), additional_headers=headers) as pane:
        pane.send(json.dumps(wire.pty_start(80, 24, tag="dash-1", cmd="/bin/sh")))
        assert json.loads(pane.recv(timeout=30))["type"] == "started"
        out = run_sdk(sdk_python, wrenn_api.key, wrenn_api.url, "pty-connect", capsule_id, "dash-1")
        assert "from-sdk" in out["seen"]
        # the pane, still attached, saw what the SDK typed
        seen, kinds = "", []
        while "from-sdk\r\n" not in seen.replace("echo from-sdk", ""):
            message = json.loads(pane.recv(timeout=30))
            kinds.append(message["type"])
            seen += message.get("data", "") if message["type"] == "output" else ""
        # leaving the SDK's `with` only detaches: the session is the pane's again
        listed = []
        for _ in range(30):
            listed = httpx.get(f"{capsule.envd_url}/pty", headers=headers, timeout=10).json()
            if [(s["alive"], s["attached"]) for s in listed if s["tag"] == "dash-1"] == [(True, 1)]:
                break
            time.sleep(0.5)
        assert [(s["alive"], s["attached"]) for s in listed if s["tag"] == "dash-1"] == [
            (True, 1)
        ], (listed, kinds)
        pane.send(json.dumps(wire.pty_input("exit\n")))
        while json.loads(pane.recv(timeout=30))["type"] != "exit":
            pass
