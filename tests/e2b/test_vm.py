"""The done-when of issue 9: the unmodified E2B SDK (from PyPI, in its own venv) creates,
uses, pauses and resumes real capsules through ``wrenn-tui``'s agent API."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backend.api.capsules import Capsules, ManagerCapsules
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.store import Store
from backend.capsules.templates import Template
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
        params={"path": "/home/user/marker"},
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


def test_e2b_sandboxes_are_e2b_base(vm_api: ServerThread, sdk_python: Path) -> None:
    """Issue 14: the built-in template is E2B's `base` for an E2B client: user `user` (uid
    1000) in /home/user with passwordless sudo; git, curl, pip and venv; `user=` still works."""
    env = run_sdk(sdk_python, vm_api.key, vm_api.url, "base-environment", timeout=300)
    assert env["whoami"] == "user"
    assert env["id"] == "1000"
    assert env["pwd"] == env["home"] == "/home/user"
    assert env["sudo"] == "root"
    assert env["root_run"] == "root"
    assert "git version" in env["tools"] and "curl" in env["tools"]
    assert "pip" in env["tools"] and env["tools"].rstrip().endswith("1")
    assert env["owner"] == "user"
    assert env["relative"] == "x"


def test_snapshots_and_forks_through_the_sdk(
    vm_api: ServerThread, sdk_python: Path, paths: Paths
) -> None:
    """Issue 14 through the unmodified SDK: create_snapshot / list_snapshots / delete_snapshot
    / fork / create(template=snapshot), and the API's answers to bad input."""
    name = f"e2b-snap-{secrets.token_hex(3)}"
    out = run_sdk(sdk_python, vm_api.key, vm_api.url, "snapshots-and-fork", name, timeout=600)
    assert out["snapshot"] == {"id": name, "names": [name]}
    assert name in out["listed"] and name in out["listed_source"]
    assert out["listed_other"] == []
    # a capsule made from the snapshot has the file, the running server and the default user
    clone = out["clone"]
    assert clone["id"] != out["source"]
    assert clone["file"] == "before" and clone["server"] == "before"
    assert clone["whoami"] == "user" and clone["template"] == name
    # forks: distinct, with the source's file and server; a fork's writes stay its own
    forks = out["forks"]
    assert len({f["id"] for f in forks} | {out["source"]}) == 3
    assert [f["file"] for f in forks] == ["changed in fork 0", "before"]
    assert [f["server"] for f in forks] == ["changed in fork 0", "before"]
    assert all(f["token_differs"] for f in forks)
    assert forks[0]["random"] != forks[1]["random"]
    assert out["source_file"] == "before"
    assert out["foreign_token_status"] == 401
    # bad input: clear 4xx answers
    assert out["duplicate"]["status"] == 409 and "exists already" in out["duplicate"]["message"]
    assert (
        out["bad_name"]["status"] == 400 and "invalid snapshot name" in out["bad_name"]["message"]
    )
    assert "not found" in out["unknown_template"]["message"]
    in_use = out["delete_in_use"]
    assert in_use["status"] == 409 and clone["id"] in in_use["message"], in_use
    assert out["delete_builtin"]["status"] == 400, out["delete_builtin"]
    assert out["fork_unknown"]["type"] == "SandboxNotFoundException", out["fork_unknown"]
    assert out["fork_bad_count"]["code"] == 400, out["fork_bad_count"]
    assert out["deleted"] is True and out["deleted_again"] is False
    manager_templates = [t.name for t in asyncio.run(_templates(paths))]
    assert name not in manager_templates
    print("steps", out["steps"])


async def _templates(paths: Paths) -> list[Template]:
    manager = CapsuleManager(paths)
    try:
        return manager.list_templates()
    finally:
        await manager.close()


def test_filesystem_only_pause_boots_on_the_paused_disk(
    vm_api: ServerThread, sdk_python: Path
) -> None:
    """E2B's `pause(keep_memory=False)`: resumed by a boot on the paused disk (files there,
    processes gone, a new boot id), still as the E2B user."""
    out = run_sdk(sdk_python, vm_api.key, vm_api.url, "pause-filesystem-only", timeout=600)
    assert out["paused"] is True and out["state"] == "paused" and out["same_id"]
    assert out["marker"] == "persisted"
    assert len(out["boot_id"]) == 36, out  # a /proc file (size 0) is read to its end
    assert out["boot_changed"] is True, out
    assert out["sleepers"] == "0"
    assert out["whoami"] == "user"
