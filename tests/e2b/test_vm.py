"""The done-when of issue 9: the unmodified E2B SDK (from PyPI, in its own venv) creates,
uses, pauses and resumes real capsules through ``wrenn-tui``'s agent API."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backend.api.capsules import Capsules, ManagerCapsules
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from backend.envd.app import create_app
from backend.envd.config import Config
from backend.envd.service import Envd
from tests.integration.conftest import destroy_all

from .conftest import ServerThread, run_sdk

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module", autouse=True)
def envd_mounts_the_connect_facade(tmp_path_factory: pytest.TempPathFactory) -> None:
    # The image packs backend/envd as it is (built_image checks it is current): without the
    # mount line in app.py the guest would serve no RPC at all.
    app = create_app(Envd(Config(root=tmp_path_factory.mktemp("envd"))))
    paths = {getattr(route, "path", "") for route in app.routes}
    if "/process.Process/{method}" not in paths:
        pytest.fail("backend/envd/app.py does not mount backend.envd.connect.routes(envd)")


@pytest.fixture
def vm_api(paths: Paths) -> Iterator[ServerThread]:
    async def make() -> Capsules:
        manager = CapsuleManager(paths)
        await manager.start(watchdog=False)
        return ManagerCapsules(manager)

    async def close(capsules: Capsules) -> None:
        assert isinstance(capsules, ManagerCapsules)
        await capsules.manager.close()

    server = ServerThread(make, close).start()
    try:
        yield server
    finally:
        server.stop()
        asyncio.run(destroy_all(paths))


def test_the_sdk_drives_capsules(vm_api: ServerThread, sdk_python: Path, paths: Paths) -> None:
    sync = run_sdk(sdk_python, vm_api.key, vm_api.url, "lifecycle")
    assert sync["paused_error"] == "SandboxNotRunningException"
    done = run_sdk(sdk_python, vm_api.key, vm_api.url, "lifecycle-async")
    auth = run_sdk(sdk_python, vm_api.key, vm_api.url, "wrong-key")
    assert auth["error"] == "AuthenticationException"
    # The dashboard reads the same state database: what the SDK did is in the event log.
    store = Store(paths.database)
    try:
        for sandbox_id in (sync["sandbox_id"], done["sandbox_id"]):
            kinds = [e.kind for e in store.events(sandbox_id)]
            for kind in ("create", "e2b", "paused", "running", "destroy"):
                assert kind in kinds, (sandbox_id, kinds)
            assert store.get(sandbox_id) is None
    finally:
        store.close()
    print("steps", sync["steps"], done["steps"])


def test_a_dashboard_pause_is_resumed_by_connect(
    vm_api: ServerThread, sdk_python: Path, paths: Paths
) -> None:
    with vm_api.client() as client:
        created = client.post("/v2/sandboxes", json={"templateID": "base"})
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    marker = httpx.post(
        f"{vm_api.url}/files",
        params={"path": "/root/marker"},
        files={"file": ("marker", b"before-pause\n")},
        headers={"E2b-Sandbox-Id": sandbox_id, "X-Access-Token": created.json()["envdAccessToken"]},
        timeout=30,
    )
    assert marker.status_code == 200, marker.text

    async def dashboard_pause() -> State:
        manager = CapsuleManager(paths)
        try:
            await manager.pause(sandbox_id)
            return manager.get(sandbox_id).state
        finally:
            await manager.close()

    assert asyncio.run(dashboard_pause()) == State.PAUSED
    run_sdk(sdk_python, vm_api.key, vm_api.url, "connect-run", sandbox_id)
