"""Issue 16 item 1: the sandbox proxy cannot be steered to another host or port, and never
hands the agent's credentials to a guest."""

from __future__ import annotations

import base64

import httpx

from backend.capsules.models import State
from tests.e2b.conftest import HostCapsules, ServerThread

from .listeners import RecordingListener, raw_request


def _sandbox(server: ServerThread) -> str:
    with server.client() as client:
        created = client.post("/v2/sandboxes", json={"templateID": "base"})
    assert created.status_code == 201, created.text
    sandbox_id: str = created.json()["sandboxID"]
    return sandbox_id


def test_proxy_target_cannot_name_another_host(host_api: ServerThread) -> None:
    sandbox_id = _sandbox(host_api)
    with RecordingListener() as victim:
        for target in (
            f"@127.0.0.1:{victim.port}/x",
            f"@127.0.0.1:{victim.port}",
            f"http://127.0.0.1:{victim.port}/x",
        ):
            answer = raw_request(
                host_api.port,
                f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nE2b-Sandbox-Id: {sandbox_id}\r\n"
                "Connection: close\r\n\r\n".encode(),
            )
            status = answer.split(b"\r\n", 1)[0]
            assert b"reached" not in answer, (target, answer)
            # uvicorn itself may refuse an absolute-form target; either way a 4xx.
            assert status.split()[1].startswith(b"4"), (target, answer)
        assert victim.connections == 0, "the proxy connected to a port it was steered to"
    # The ordinary path still works.
    health = httpx.get(f"{host_api.url}/health", headers={"E2b-Sandbox-Id": sandbox_id})
    assert health.status_code == 200


def test_proxy_never_forwards_the_api_key_or_bearer_credentials(host_api: ServerThread) -> None:
    fake = host_api.capsules
    assert isinstance(fake, HostCapsules)
    sandbox_id = _sandbox(host_api)
    with RecordingListener() as guest:
        # The capsule's envd is a listener that shows what the proxy sent it.
        fake.capsules[sandbox_id] = fake.get(sandbox_id).with_(
            host_port=guest.port, state=State.RUNNING
        )
        identity = "Basic " + base64.b64encode(b"user:").decode()
        for authorization in ("Bearer " + host_api.key, identity):
            answer = httpx.get(
                f"{host_api.url}/files?path=/x",
                headers={
                    "E2b-Sandbox-Id": sandbox_id,
                    "X-API-KEY": host_api.key,
                    "Authorization": authorization,
                    "X-Access-Token": "envd-token",
                },
            )
            assert answer.status_code == 200 and answer.text == "reached"
        assert len(guest.requests) == 2
        sent = b"\n".join(guest.requests).decode().lower()
        assert host_api.key.lower() not in sent
        assert "x-api-key" not in sent
        assert "bearer" not in sent
        # What the guest needs still goes through: its token and E2B's user identity.
        assert sent.count("x-access-token: envd-token") == 2
        assert ("authorization: " + identity.lower()) in guest.requests[1].decode().lower()
