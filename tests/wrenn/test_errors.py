"""Bad input to Wrenn's API is a 4xx in Wrenn's error shape with a message a person can act
on, never a 500 or a hang; the SDK turns each into its own typed exception."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from tests.e2b.conftest import ServerThread

from .conftest import run_sdk


def assert_error(response: httpx.Response, status: int, code: str, words: str) -> None:
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert error["code"] == code, error
    assert words.lower() in error["message"].lower(), error


def test_the_sdk_raises_its_typed_errors(wrenn_api: ServerThread, sdk_python: Path) -> None:
    out = run_sdk(sdk_python, wrenn_api.key, wrenn_api.url, "errors")
    assert "not found" in out["unknown"]
    assert "no-such-template" in out["unknown_template"]
    assert "vcpus" in out["bad_vcpus"]
    assert "X-API-Key" in out["wrong_key"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"vcpus": "two"}).encode(), "vcpus"),
        (json.dumps({"vcpus": 65}).encode(), "vcpus"),
        (json.dumps({"memory_mb": 10}).encode(), "memory_mb"),
        (json.dumps({"timeout_sec": -1}).encode(), "timeout_sec"),
        (json.dumps({"template": ""}).encode(), "template"),
        (json.dumps({"metadata": {"bad key": "x"}}).encode(), "metadata key"),
        (json.dumps({"metadata": {"envd_version": "x"}}).encode(), "reserved"),
        (json.dumps({"metadata": {f"k{i}": "v" for i in range(21)}}).encode(), "at most 20"),
        (json.dumps({"metadata": {"k": "v" * 65}}).encode(), "64 characters"),
    ],
)
def test_create_rejects_bad_bodies(wrenn_api: ServerThread, body: bytes, words: str) -> None:
    with wrenn_api.client() as client:
        response = client.post("/v1/capsules", content=body)
        assert_error(response, 400, "invalid_request", words)
        assert client.get("/v1/capsules").json() == []


def test_requests_without_a_capsule(wrenn_api: ServerThread) -> None:
    with wrenn_api.client() as client:
        assert_error(client.get("/v1/teams"), 404, "not_found", "does not provide")
        assert_error(client.post("/v1/hosts/register"), 404, "not_found", "hosts")
        assert_error(client.get("/v1/api-keys"), 404, "not_found", "wrenn-tui api-key")
        assert_error(client.get("/v1/nothing-here"), 404, "not_found", "no route")
        assert client.put("/v1/capsules").status_code == 405
        assert_error(
            client.post("/v1/capsules", json={"template": "nope"}), 404, "not_found", "nope"
        )
        assert_error(client.get("/v1/capsules/cl-unknown"), 404, "not_found", "cl-unknown")
        assert_error(client.delete("/v1/capsules/cl-unknown"), 404, "not_found", "not found")
        assert_error(client.post("/v1/capsules/cl-unknown/pause"), 404, "not_found", "")
        assert_error(client.post("/v1/capsules/cl-unknown/resume"), 404, "not_found", "")
        assert_error(client.post("/v1/capsules/cl-unknown/ping"), 404, "not_found", "")
        assert_error(
            client.post("/v1/capsules/cl-unknown/exec", json={"cmd": "true"}), 404, "not_found", ""
        )
        assert_error(client.get("/v1/capsules/cl-unknown/metrics"), 404, "not_found", "")
        assert_error(client.get("/v1/capsules/stats?range=2y"), 400, "invalid_request", "range")
        assert_error(
            client.get("/v1/capsules/usage?from=2026-13-01"), 400, "invalid_request", "from"
        )
        assert_error(
            client.get("/v1/capsules/usage?from=2026-02-01&to=2026-01-01"),
            400,
            "invalid_request",
            "after",
        )
        assert_error(client.post("/v1/snapshots", json={}), 400, "invalid_request", "sandbox_id")
        assert_error(
            client.post("/v1/snapshots", json={"sandbox_id": "cl-unknown"}), 404, "not_found", ""
        )
        assert_error(client.get("/v1/snapshots?type=other"), 400, "invalid_request", "type")
        assert_error(client.delete("/v1/snapshots/default"), 403, "forbidden", "protected")
        assert_error(client.delete("/v1/snapshots/not-there"), 404, "not_found", "not-there")
        bases = client.get("/v1/snapshots?type=base").json()
        assert [t["name"] for t in bases] == ["default"] and bases[0]["protected"] is True
        unauthorized = httpx.get(f"{wrenn_api.url}/v1/capsules", headers={"X-API-Key": "no"})
        assert_error(unauthorized, 401, "unauthorized", "api-key")


def test_websockets_refuse_a_wrong_key_or_capsule(wrenn_api: ServerThread) -> None:
    url = wrenn_api.url.replace("http://", "ws://")
    for path, headers, status in (
        ("/v1/capsules/cl-x/pty", {"X-API-Key": "wrong"}, 401),
        ("/v1/capsules/cl-x/pty", {"X-API-Key": wrenn_api.key}, 404),
        ("/v1/capsules/cl-x/exec/stream", {"X-API-Key": wrenn_api.key}, 404),
        ("/v1/capsules/cl-x/processes/1/stream", {"X-API-Key": wrenn_api.key}, 404),
    ):
        with pytest.raises(InvalidStatus) as refused:
            ws_connect(url + path, additional_headers=headers, open_timeout=10)
        assert refused.value.response.status_code == status
        assert b'"error"' in (refused.value.response.body or b"")


# -- on a running capsule ---------------------------------------------------------------------


@pytest.fixture
def running(wrenn_api: ServerThread) -> Iterator[tuple[httpx.Client, str]]:
    with wrenn_api.client() as client:
        created = client.post("/v1/capsules", json={}, timeout=120)
        assert created.status_code == 201, created.text
        capsule_id = created.json()["id"]
        for _ in range(120):
            if client.get(f"/v1/capsules/{capsule_id}").json()["status"] == "running":
                break
            wrenn_api.call(_sleep(1))
        yield client, capsule_id


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def multipart(parts: list[tuple[str, bytes]], boundary: str = "b0undary") -> tuple[bytes, str]:
    body = b""
    for name, value in parts:
        filename = b'; filename="upload"' if name == "file" else b""
        body += (
            f"--{boundary}\r\n".encode()
            + b'Content-Disposition: form-data; name="'
            + name.encode()
            + b'"'
            + filename
            + b"\r\n\r\n"
            + value
            + b"\r\n"
        )
    body += f"--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@pytest.mark.vm
def test_bad_input_on_a_running_capsule(
    wrenn_api: ServerThread, running: tuple[httpx.Client, str]
) -> None:
    client, cid = running
    base = f"/v1/capsules/{cid}"
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/exec", {}, 400, "cmd"),
        ("POST", "/exec", {"cmd": "echo", "args": "x"}, 400, "args"),
        ("POST", "/exec", {"cmd": "true", "timeout_sec": 0}, 400, "timeout_sec"),
        ("POST", "/exec", {"cmd": "true", "background": "yes"}, 400, "background"),
        ("POST", "/exec", {"cmd": "true", "envs": {"A": 1}}, 400, "envs"),
        ("POST", "/exec", {"cmd": "true", "cwd": "/no/such/dir"}, 400, "/no/such/dir"),
        ("POST", "/exec", {"cmd": "/no/such/program"}, 400, "command not found"),
        ("POST", "/files/read", {}, 400, "path"),
        ("POST", "/files/read", {"path": "/tmp"}, 400, "directory"),
        ("POST", "/files/read", {"path": "/no/such/file"}, 404, "no/such/file"),
        ("POST", "/files/list", {"path": "/tmp", "depth": -1}, 400, "depth"),
        ("POST", "/files/list", {"path": "/etc/hostname"}, 400, "not a directory"),
        ("POST", "/files/mkdir", {"path": "/etc/hostname"}, 400, "not a directory"),
        ("POST", "/files/remove", {"path": "/"}, 400, "root"),
    ]
    for method, path, body, status, words in cases:
        response = client.request(method, base + path, json=body)
        assert response.status_code == status, (path, body, response.text)
        if status >= 400:
            assert words.lower() in response.json()["error"]["message"].lower(), response.text
    assert_error(client.delete(base + "/processes/99999"), 404, "not_found", "")
    assert_error(
        client.delete(base + "/processes/1?signal=SIGHUP"), 400, "invalid_request", "signal"
    )
    # uploads: wrong type, the path after the file, no boundary, cut off
    text = client.post(base + "/files/write", content=b"x", headers={"content-type": "text/plain"})
    assert_error(text, 415, "invalid_request", "multipart")
    body, ctype = multipart([("file", b"data"), ("path", b"/tmp/late")])
    late = client.post(base + "/files/write", content=body, headers={"content-type": ctype})
    assert_error(late, 400, "invalid_request", "before")
    nob = client.post(
        base + "/files/write", content=b"--x\r\n", headers={"content-type": "multipart/form-data"}
    )
    assert_error(nob, 400, "invalid_request", "boundary")
    body, ctype = multipart([("path", b"/tmp/cut"), ("file", b"partial")])
    cut = client.post(base + "/files/write", content=body[:-40], headers={"content-type": ctype})
    assert cut.status_code == 400, cut.text
    exists = client.post(base + "/files/list", json={"path": "/tmp"}).json()["entries"]
    assert "cut" not in {e["name"] for e in exists}, "a cut-off upload left a file"
    # snapshots
    assert_error(
        client.post("/v1/snapshots", json={"sandbox_id": cid, "name": "Bad Name"}),
        400,
        "invalid_request",
        "invalid template name",
    )
    assert_error(
        client.post("/v1/snapshots", json={"sandbox_id": cid, "name": "default"}),
        409,
        "conflict",
        "base template",
    )
    assert_error(
        client.post("/v1/snapshots", json={"sandbox_id": cid, "name": "minimal-ubuntu"}),
        409,
        "conflict",
        "base template",
    )
    # state conflicts
    assert_error(client.post(base + "/resume"), 409, "invalid_state", "running")
    # WebSockets: bad first messages get an error message, never a dropped connection
    url = wrenn_api.url.replace("http://", "ws://") + base
    headers = {"X-API-Key": wrenn_api.key}
    with ws_connect(url + "/pty", additional_headers=headers, open_timeout=10) as ws:
        ws.send(b"\x00binary first")
        reply = json.loads(ws.recv(timeout=10))
        assert reply["type"] == "error" and reply["fatal"] is True, reply
    with ws_connect(url + "/pty", additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "connect", "tag": "no-such-tag"}))
        reply = json.loads(ws.recv(timeout=30))
        assert reply["type"] == "error" and reply["fatal"] is True, reply
    with ws_connect(url + "/exec/stream", additional_headers=headers, open_timeout=10) as ws:
        ws.send(json.dumps({"type": "start"}))
        reply = json.loads(ws.recv(timeout=10))
        assert reply["type"] == "error" and "cmd" in reply["data"], reply
    with ws_connect(
        url + "/processes/no-such/stream", additional_headers=headers, open_timeout=10
    ) as ws:
        reply = json.loads(ws.recv(timeout=30))
        assert reply["type"] == "error", reply
    # pause, then what needs a running capsule is a conflict
    paused = client.post(base + "/pause", timeout=120)
    assert paused.status_code == 200 and paused.json()["status"] == "paused", paused.text
    assert_error(client.post(base + "/pause"), 409, "invalid_state", "paused")
    assert_error(client.post(base + "/ping"), 409, "invalid_state", "paused")
    assert_error(
        client.post(base + "/files/read", json={"path": "/etc/hostname"}),
        409,
        "invalid_state",
        "resume it first",
    )
    assert client.delete(base).status_code == 204
