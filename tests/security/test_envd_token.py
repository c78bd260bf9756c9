"""Issue 16 item 2, envd's half (real envd processes over real sockets): a token is only ever
replaced by another, a refused /init changes nothing, everything opened under a token ends
when it is replaced, and under the agent envd takes its first token from the host's metadata
and answers nothing else before it has one."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.envd.conftest import Envd, start_envd


@pytest.fixture
def envd(tmp_path: Path) -> Iterator[Envd]:
    instance = start_envd(tmp_path / "root")
    try:
        yield instance
    finally:
        instance.stop()
        assert "Traceback" not in instance.log(), instance.log()


def test_empty_token_is_refused_and_changes_nothing(envd: Envd) -> None:
    with envd.client() as c:
        assert c.post("/init", json={"accessToken": "first"}).status_code == 200
        old = {"X-Access-Token": "first"}
        empty = c.post("/init", json={"accessToken": ""}, headers=old)
        assert empty.status_code == 400, empty.text
        assert "accessToken" in empty.json()["message"]
        assert c.get("/metrics").status_code == 401, "an empty token opened envd to everyone"
        assert c.get("/metrics", headers=old).status_code == 200


def test_refused_init_changes_nothing(envd: Envd) -> None:
    with envd.client() as c:
        assert c.post("/init", json={"accessToken": "first"}).status_code == 200
        old = {"X-Access-Token": "first"}
        refused = c.post(
            "/init",
            json={
                "accessToken": "second",
                "envVars": {"LEAKED": "yes"},
                "defaultWorkdir": "relative/dir",
            },
            headers=old,
        )
        assert refused.status_code == 400, refused.text
        assert c.get("/metrics", headers={"X-Access-Token": "second"}).status_code == 401
        assert c.get("/metrics", headers=old).status_code == 200
        out = c.post("/exec", json={"cmd": "echo ${LEAKED:-unset}"}, headers=old).json()
        assert out["stdout"] == "unset\n"


async def test_token_change_closes_sockets_and_streams_opened_before(envd: Envd) -> None:
    async with httpx.AsyncClient(base_url=envd.url, timeout=15) as c:
        # Opened while envd had no token yet (the window a host /init closes) ...
        ws = await connect(envd.ws_url)
        await ws.send(json.dumps({"type": "start", "tag": "early", "cols": 80, "rows": 24}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "started"
        started = await c.post("/processes", json={"cmd": "sleep 60"})
        pid = started.json()["pid"]
        async with c.stream("GET", f"/processes/{pid}/events") as events:
            lines = events.aiter_lines()
            assert json.loads(await asyncio.wait_for(anext(lines), 10))["type"] == "start"
            # ... ends when the host's /init sets a token.
            assert (await c.post("/init", json={"accessToken": "t1"})).status_code == 200
            begun = time.monotonic()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(5):
                    while True:
                        await ws.recv()
            rest = []
            with pytest.raises((StopAsyncIteration, httpx.HTTPError)):
                async with asyncio.timeout(5):
                    while True:
                        rest.append(await anext(lines))
            assert time.monotonic() - begun < 5
            assert not any('"exit"' in line for line in rest), "the process did not end it"
        # The same for what was opened under t1 when t2 replaces it.
        t1 = {"X-Access-Token": "t1"}
        ws = await connect(envd.ws_url, additional_headers=t1)
        await ws.send(json.dumps({"type": "connect", "tag": "early"}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connected"
        rotated = await c.post("/init", json={"accessToken": "t2"}, headers=t1)
        assert rotated.status_code == 200
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(5):
                while True:
                    await ws.recv()
        assert (await c.get("/metrics", headers=t1)).status_code == 401
        assert (await c.get("/metrics", headers={"X-Access-Token": "t2"})).status_code == 200


def test_under_the_agent_envd_waits_for_the_metadata_token(tmp_path: Path) -> None:
    """Guest mode with a metadata source (how wrenn-init starts envd in a capsule)."""
    source = tmp_path / "metadata.json"
    source.write_text(json.dumps({"instanceID": "cl-x", "accessToken": "from-host"}))
    envd = start_envd(
        tmp_path / "root",
        "--metadata",
        f"file:{source}",
        "--metadata-interval",
        "0.1",
        guest_mode=True,
    )
    try:
        with envd.client() as c:
            assert c.get("/health").status_code == 200
            for path in ("/metrics", "/files?path=/etc/hostname"):
                assert c.get(path).status_code == 401, path
            assert c.post("/init", json={"accessToken": "mine"}).status_code == 401
            assert c.post("/exec", json={"cmd": "true"}).status_code == 401
            host = {"X-Access-Token": "from-host"}
            assert c.get("/metrics", headers=host).status_code == 200
            assert c.post("/init", json={"accessToken": "new"}, headers=host).status_code == 200
            # A later metadata poll never puts the first token back.
            time.sleep(0.3)
            assert c.get("/metrics", headers=host).status_code == 401
    finally:
        envd.stop()
