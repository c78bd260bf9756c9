"""The unmodified E2B SDK against the agent API, the sandbox proxy and envd's Connect façade,
with host envd processes playing the capsules (tests/e2b/test_vm.py does it with VMs)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

from .conftest import HostCapsules, ServerThread, run_sdk


def fake(server: ServerThread) -> HostCapsules:
    assert isinstance(server.capsules, HostCapsules)
    return server.capsules


def test_sdk_lifecycle_sync(host_api: ServerThread, sdk_python: Path) -> None:
    out = run_sdk(sdk_python, host_api.key, host_api.url, "lifecycle")
    assert out["paused_error"] == "SandboxNotRunningException"
    assert out["pty_tag"].startswith("pty-")
    assert fake(host_api).capsules == {}, "kill() left the capsule behind"
    assert (out["sandbox_id"], "e2b") in [(c, k) for c, k, _ in fake(host_api).events]


def test_sdk_lifecycle_async(host_api: ServerThread, sdk_python: Path) -> None:
    out = run_sdk(sdk_python, host_api.key, host_api.url, "lifecycle-async")
    assert out["sandbox_id"].startswith("cl-")
    assert fake(host_api).capsules == {}


def test_wrong_api_key_is_an_authentication_error(host_api: ServerThread, sdk_python: Path) -> None:
    out = run_sdk(sdk_python, host_api.key, host_api.url, "wrong-key")
    assert out["error"] == "AuthenticationException"
    assert fake(host_api).capsules == {}


def test_a_terminal_the_dashboard_started_is_driven_by_the_sdk(
    host_api: ServerThread, sdk_python: Path
) -> None:
    with host_api.client() as client:
        created = client.post("/v2/sandboxes", json={"templateID": "base"})
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    capsule = fake(host_api).get(sandbox_id)

    async def dashboard() -> str:
        url = f"ws://127.0.0.1:{capsule.host_port}/pty?access_token={capsule.access_token}"
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "tag": "dash-pane", "cols": 80}))
            assert json.loads(await ws.recv())["type"] == "started"
            driven = asyncio.create_task(
                asyncio.to_thread(
                    run_sdk,
                    sdk_python,
                    host_api.key,
                    host_api.url,
                    "drive-pty",
                    sandbox_id,
                    "dash-pane",
                )
            )
            seen = ""
            deadline = time.monotonic() + 30
            while "from-sdk\r\n" not in seen.replace("echo from-sdk", ""):
                message = json.loads(await asyncio.wait_for(ws.recv(), deadline - time.monotonic()))
                if message["type"] == "output":
                    seen += message["data"]
            await driven
            return seen

    assert "from-sdk" in asyncio.run(dashboard())


def test_envvars_reach_commands_and_metadata_is_listed(host_api: ServerThread) -> None:
    with host_api.client() as client:
        created = client.post(
            "/v2/sandboxes",
            json={"templateID": "base", "envVars": {"GREETING": "hej"}, "metadata": {"k": "v"}},
        ).json()
        sandbox_id = created["sandboxID"]
        assert created["envdVersion"] >= "0.6.4"
        listed = client.get("/v2/sandboxes", params={"metadata": "k=v"}).json()
        assert [s["sandboxID"] for s in listed] == [sandbox_id]
        assert client.get("/v2/sandboxes", params={"metadata": "k=w"}).json() == []
        detail = client.get(f"/sandboxes/{sandbox_id}").json()
        assert detail["state"] == "running" and detail["metadata"] == {"k": "v"}
    capsule = fake(host_api).get(sandbox_id)
    result = httpx.post(
        f"{capsule.envd_url}/exec",
        json={"cmd": "echo $GREETING"},
        headers={"X-Access-Token": capsule.access_token},
    ).json()
    assert result["stdout"] == "hej\n"


def test_lifecycle_statuses(host_api: ServerThread) -> None:
    with host_api.client() as client:
        assert client.post("/sandboxes/cl-nope/pause").status_code == 404
        assert client.delete("/sandboxes/cl-nope").status_code == 404
        assert client.post("/v2/sandboxes/cl-nope/connect", json={}).status_code == 404
        unknown = client.post("/v2/sandboxes", json={"templateID": "no-such-template"})
        assert unknown.status_code == 404 and unknown.json()["code"] == 404
        sandbox_id = client.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
        assert client.post(f"/v2/sandboxes/{sandbox_id}/connect", json={}).status_code == 200
        assert client.post(f"/sandboxes/{sandbox_id}/pause").status_code == 204
        again = client.post(f"/sandboxes/{sandbox_id}/pause")
        assert again.status_code == 409 and set(again.json()) >= {"code", "message"}
        assert client.get(f"/sandboxes/{sandbox_id}").json()["state"] == "paused"
        assert client.post(f"/v2/sandboxes/{sandbox_id}/connect", json={}).status_code == 201
        assert client.get(f"/sandboxes/{sandbox_id}").json()["state"] == "running"
        timeout = client.post(f"/sandboxes/{sandbox_id}/timeout", json={"timeout": 60})
        assert timeout.status_code == 204
        metrics = client.get(f"/sandboxes/{sandbox_id}/metrics").json()
        assert metrics and metrics[0]["memTotal"] > 0
        assert client.delete(f"/sandboxes/{sandbox_id}").status_code == 204
        assert client.get(f"/sandboxes/{sandbox_id}").status_code == 404


def test_no_key_no_api(host_api: ServerThread) -> None:
    assert httpx.get(f"{host_api.url}/v2/sandboxes").status_code == 401
    wrong = httpx.get(f"{host_api.url}/v2/sandboxes", headers={"X-API-KEY": "wrenn_x"})
    assert wrong.status_code == 401 and wrong.json()["code"] == 401
    assert httpx.get(f"{host_api.url}/health").status_code == 200


def test_proxy_answers_for_sandboxes_it_cannot_reach(host_api: ServerThread) -> None:
    unknown = httpx.get(f"{host_api.url}/health", headers={"E2b-Sandbox-Id": "cl-gone"})
    assert unknown.status_code == 502 and "was not found" in unknown.json()["message"]
    with host_api.client() as client:
        sandbox_id = client.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8080"}
    closed = httpx.get(f"{host_api.url}/health", headers=headers)
    assert closed.status_code == 502 and "port is not open" in closed.json()["message"]
    headers["E2b-Sandbox-Port"] = "49983"
    assert httpx.get(f"{host_api.url}/health", headers=headers).status_code == 200
    # envd, not the proxy, checks the sandbox's access token.
    assert httpx.get(f"{host_api.url}/files?path=/etc", headers=headers).status_code == 401


def test_gzip_upload_is_stored_decompressed(host_api: ServerThread) -> None:
    import gzip

    with host_api.client() as client:
        created = client.post("/v2/sandboxes", json={"templateID": "base"}).json()
    headers = {
        "E2b-Sandbox-Id": created["sandboxID"],
        "X-Access-Token": created["envdAccessToken"],
    }
    put = httpx.post(
        f"{host_api.url}/files",
        params={"path": "/root/z.txt"},
        content=gzip.compress(b"zipped"),
        headers={**headers, "Content-Type": "application/octet-stream", "Content-Encoding": "gzip"},
    )
    assert put.status_code == 200, put.text
    got = httpx.get(f"{host_api.url}/files", params={"path": "/root/z.txt"}, headers=headers)
    assert got.content == b"zipped"


def test_timeout_destroys_or_pauses(host_api: ServerThread) -> None:
    with host_api.client() as client:
        killed = client.post("/v2/sandboxes", json={"templateID": "base", "timeout": 1})
        paused = client.post(
            "/v2/sandboxes", json={"templateID": "base", "timeout": 1, "autoPause": True}
        )
        kept = client.post("/v2/sandboxes", json={"templateID": "base", "timeout": 600})
    capsules = fake(host_api)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if killed.json()["sandboxID"] not in capsules.capsules and (
            capsules.get(paused.json()["sandboxID"]).state == "paused"
        ):
            break
        time.sleep(0.1)
    assert killed.json()["sandboxID"] not in capsules.capsules
    assert capsules.get(paused.json()["sandboxID"]).state == "paused"
    assert capsules.get(kept.json()["sandboxID"]).state == "running"


def test_proxied_use_counts_as_activity_for_auto_pause(host_api: ServerThread) -> None:
    with host_api.client() as client:
        plain = client.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
        idle = client.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
    capsules = fake(host_api)
    capsules.capsules[idle] = capsules.get(idle).with_(auto_pause_s=60)
    for sandbox_id in (plain, idle):
        httpx.get(f"{host_api.url}/health", headers={"E2b-Sandbox-Id": sandbox_id})
    assert capsules.touched == {idle}


def test_list_started_after_and_metrics_in_a_time_range(host_api: ServerThread) -> None:
    """`startedAfter` on the list (inclusive, to the microsecond `startedAt` shows) and
    `start`/`end` on metrics (a range before the sample is empty); bad times are a 400."""
    with host_api.client() as client:
        created = client.post("/v2/sandboxes", json={"templateID": "base"}).json()
        sandbox_id = created["sandboxID"]
        started_at = client.get(f"/sandboxes/{sandbox_id}").json()["startedAt"]

        def listed(**params: str) -> list[str]:
            response = client.get("/v2/sandboxes", params=params)
            assert response.status_code == 200, response.text
            return [s["sandboxID"] for s in response.json()]

        assert sandbox_id in listed(startedAfter=started_at)
        later = datetime.fromisoformat(started_at) + timedelta(seconds=1)
        assert sandbox_id not in listed(startedAfter=later.isoformat())
        assert sandbox_id in listed(startedAfter=str(int(time.time()) - 60))
        bad = client.get("/v2/sandboxes", params={"startedAfter": "yesterday"})
        assert bad.status_code == 400 and "startedAfter" in bad.json()["message"]

        now = int(time.time())
        current = client.get(
            f"/sandboxes/{sandbox_id}/metrics", params={"start": now - 10, "end": now}
        ).json()
        assert len(current) == 1 and current[0]["timestampUnix"] >= now - 10
        before = client.get(
            f"/sandboxes/{sandbox_id}/metrics", params={"start": now - 3600, "end": now - 1800}
        )
        assert before.status_code == 200 and before.json() == []
        bad = client.get(f"/sandboxes/{sandbox_id}/metrics", params={"start": "soon"})
        assert bad.status_code == 400


def test_a_command_whose_sandbox_is_killed_ends_as_on_e2b(
    host_api: ServerThread, sdk_python: Path
) -> None:
    """The proxy ends a Connect stream cut by the sandbox's end with UNAVAILABLE; the SDK
    then probes the sandbox, finds it gone and says so."""
    out = run_sdk(sdk_python, host_api.key, host_api.url, "kill-during-run")
    assert out["error"] == "SandboxNotRunningException", out
    assert "killed or reached its end of life" in out["message"], out


def test_signed_file_urls(host_api: ServerThread, sdk_python: Path) -> None:
    """A signed URL names no sandbox: the capsule whose token verifies the signature serves
    it; an expired signature is E2B's 401, a signature for another path a 401."""
    out = run_sdk(sdk_python, host_api.key, host_api.url, "signed-urls")
    assert out["get"] == [200, "signed content"]
    assert out["expiring"] == [200, "signed content"]
    assert out["expired"] == [401, {"code": 401, "message": "signature is already expired"}]
    assert out["tampered"] == 401
    assert out["upload"] == 200 and out["uploaded"] == "via a signed url"
