"""Issue 16 items 7 and 15 (API half): every number the E2B API takes is bounded (400 outside,
and nothing stored), a templateID is a name and never a path, and numbers a guest reports are
never trusted into a 500."""

from __future__ import annotations

import json

import httpx

from backend.capsules.models import State
from tests.e2b.conftest import HostCapsules, ServerThread

from .listeners import RecordingListener


def test_out_of_range_numbers_are_400_and_listing_keeps_working(host_api: ServerThread) -> None:
    with host_api.client() as client:
        for timeout in (10**12, -1, 86_401, 1.5, "60", True):
            bad = client.post("/v2/sandboxes", json={"templateID": "base", "timeout": timeout})
            assert bad.status_code == 400, (timeout, bad.text)
            assert "timeout" in bad.json()["message"]
        assert client.get("/v2/sandboxes").json() == []
        created = client.post("/v2/sandboxes", json={"templateID": "base", "timeout": 86_400})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["sandboxID"]
        for path, body in (
            (f"/sandboxes/{sandbox_id}/timeout", {"timeout": 10**12}),
            (f"/sandboxes/{sandbox_id}/refreshes", {"duration": 10**12}),
            (f"/sandboxes/{sandbox_id}/connect", {"timeout": 10**12}),
        ):
            answer = client.post(path, json=body)
            assert answer.status_code == 400, (path, answer.text)
        for query in (
            "limit=0",
            "limit=1001",
            "limit=%C2%B2",
            "limit=-5",
            "nextToken=-1",
            "nextToken=" + "9" * 40,
            "nextToken=%D9%A3",
        ):
            answer = client.get(f"/v2/sandboxes?{query}")
            assert answer.status_code == 400, (query, answer.text)
        listed = client.get("/v2/sandboxes")
        assert listed.status_code == 200
        assert [s["sandboxID"] for s in listed.json()] == [sandbox_id]
        assert client.get("/v2/sandboxes?limit=1&nextToken=0").status_code == 200


def test_template_id_is_a_name_not_a_path(host_api: ServerThread) -> None:
    with host_api.client() as client:
        for template in ("../../x", "/etc", "a/b", ".hidden", "x" * 65, "a b"):
            answer = client.post("/v2/sandboxes", json={"templateID": template})
            assert answer.status_code == 400, (template, answer.text)
            assert "templateID" in answer.json()["message"]
        assert client.get("/v2/sandboxes").json() == []


def test_hostile_guest_metrics_are_not_a_500(host_api: ServerThread) -> None:
    fake = host_api.capsules
    assert isinstance(fake, HostCapsules)
    with host_api.client() as client:
        sandbox_id = client.post("/v2/sandboxes", json={"templateID": "base"}).json()["sandboxID"]
        body = b'{"ts": 1e300, "cpu_count": "many", "cpu_used_pct": NaN, "mem_used": Infinity}'
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        with RecordingListener(answer=answer) as guest:
            fake.capsules[sandbox_id] = fake.get(sandbox_id).with_(
                host_port=guest.port, state=State.RUNNING
            )
            metrics = client.get(f"/sandboxes/{sandbox_id}/metrics")
        assert metrics.status_code == 200, metrics.text
        (sample,) = metrics.json()
        assert sample["cpuCount"] == 1 and sample["memUsed"] == 0
        json.dumps(sample, allow_nan=False)
    assert httpx.get(f"{host_api.url}/health").status_code == 200
