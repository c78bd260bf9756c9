"""envd inside a real capsule: the numbers and the terminal the dashboard relies on."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from typing import Any

import httpx
import pytest
import websockets

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule

pytestmark = pytest.mark.vm
MiB = 1 << 20


class Envd:
    def __init__(self, capsule: Capsule) -> None:
        self.capsule = capsule
        self.client = httpx.AsyncClient(
            base_url=capsule.envd_url,
            headers={"X-Access-Token": capsule.access_token},
            timeout=30,
        )

    async def get(self, path: str) -> Any:
        response = await self.client.get(path)
        assert response.status_code == 200, response.text
        return response.json()

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = await self.client.post(path, json=body or {})
        assert response.status_code == 200, response.text
        return response.json()

    async def sh(self, cmd: str) -> str:
        result = await self.post("/exec", {"cmd": cmd})
        assert result["exit_code"] == 0, result
        return str(result["stdout"])


@pytest.fixture
async def envd(manager: CapsuleManager) -> Envd:
    capsule = await manager.create()
    return Envd(capsule)


async def test_mem_used_tracks_an_allocation(envd: Envd) -> None:
    before = (await envd.get("/metrics"))["mem_used"]
    hog = await envd.post(
        "/processes",
        {
            "cmd": "python3 -c 'b = b\"x\" * (100 * 2**20); import time; time.sleep(600)'",
        },
    )
    deadline = time.monotonic() + 20
    while (await envd.get("/metrics"))["mem_used"] - before < 90 * MiB:
        assert time.monotonic() < deadline, "a 100 MB allocation never showed in mem_used"
        await asyncio.sleep(0.5)
    await envd.post(f"/processes/{hog['pid']}/signal", {"signal": "SIGKILL"})
    deadline = time.monotonic() + 20
    while (await envd.get("/metrics"))["mem_used"] - before > 30 * MiB:
        assert time.monotonic() < deadline, "freed memory never left mem_used"
        await asyncio.sleep(0.5)
    metrics = await envd.get("/metrics")
    assert metrics["mem_used"] == metrics["mem_total"] - metrics["mem_available"]
    assert metrics["cpu_count"] == 1 and 0 <= metrics["cpu_used_pct"] <= 100


async def test_page_cache_rises_on_read_and_falls_on_prepare(envd: Envd) -> None:
    await envd.sh(
        "head -c 80000000 /dev/zero > /root/blob && sync && echo 1 > /proc/sys/vm/drop_caches"
    )
    cold = (await envd.get("/metrics"))["mem_cache"]
    await envd.sh("cat /root/blob > /dev/null")
    warm = (await envd.get("/metrics"))["mem_cache"]
    assert warm - cold > 70 * MiB
    prepared = await envd.post("/snapshot/prepare")
    assert prepared["dropped"] is True
    assert prepared["before"]["mem_cache"] - prepared["after"]["mem_cache"] > 70 * MiB
    assert (await envd.get("/metrics"))["snapshot_in_progress"] is True
    await envd.post("/snapshot/abort")


async def test_reclaimer_fires_at_threshold_but_not_while_preparing(envd: Envd) -> None:
    token = envd.capsule.access_token
    await envd.post("/init", {"accessToken": token, "reclaimThreshold": 1})
    await envd.sh("cat /usr/bin/* > /dev/null 2>&1 || true")
    deadline = time.monotonic() + 15
    while (await envd.get("/metrics"))["reclaims"] == 0:
        assert time.monotonic() < deadline, "the reclaimer never fired above its threshold"
        await asyncio.sleep(0.5)
    await envd.post("/snapshot/prepare")
    held = (await envd.get("/metrics"))["reclaims"]
    await envd.sh("cat /usr/bin/* > /dev/null 2>&1 || true")
    await asyncio.sleep(6)  # three reclaim intervals
    assert (await envd.get("/metrics"))["reclaims"] == held, "the reclaimer ran during a hold"
    await envd.post("/init", {"accessToken": token, "reclaimThreshold": 80})


async def test_pty_runs_echo_and_tty_and_resizes(envd: Envd) -> None:
    url = f"ws://127.0.0.1:{envd.capsule.host_port}/pty"
    headers = {"X-Access-Token": envd.capsule.access_token}
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"type": "start", "cols": 100, "rows": 30}))
        started = json.loads(await ws.recv())
        assert started["type"] == "started"
        output = ""

        async def read_until(marker: str) -> str:
            nonlocal output
            deadline = time.monotonic() + 20
            while marker not in output:
                assert time.monotonic() < deadline, f"never saw {marker!r} in {output[-500:]!r}"
                msg = json.loads(await asyncio.wait_for(ws.recv(), 20))
                if msg["type"] == "output":
                    output += msg["data"]
            return output

        await ws.send(json.dumps({"type": "input", "data": "echo pty-$((40+2))\n"}))
        await read_until("pty-42")
        await ws.send(json.dumps({"type": "input", "data": "tty\n"}))
        await read_until("/dev/pts/")
        await ws.send(json.dumps({"type": "input", "data": "stty size\n"}))
        await read_until("30 100")
        await ws.send(json.dumps({"type": "resize", "cols": 120, "rows": 40}))
        await ws.send(json.dumps({"type": "input", "data": "stty size\n"}))
        await read_until("40 120")
        await ws.send(json.dumps({"type": "input", "data": "pwd\n"}))
        await read_until("/root")


async def test_metadata_files_exist(envd: Envd) -> None:
    out = await envd.sh(
        "cat /run/wrenn/.WRENN_SANDBOX_ID; echo; cat /run/wrenn/.WRENN_TEMPLATE_ID;"
        " echo; echo $WRENN_SANDBOX_ID"
    )
    sandbox, template, exported = out.split()
    assert sandbox == envd.capsule.id == exported
    assert template == "default"


async def test_envd_logs_to_the_host_console_never_to_the_capsule_disk(
    manager: CapsuleManager, envd: Envd
) -> None:
    """envd's log is the console the host keeps (capped, rotated, shown on the detail screen),
    so what envd says reaches the host even when envd cannot answer; a line per command on
    the capsule's own disk dirtied the disk and its journal, which snapshots then carried."""
    marker = f"wrenn-log-{secrets.token_hex(4)}"
    await envd.sh(f"true {marker}")
    console = manager.layout.console_log(envd.capsule.id)
    deadline = time.monotonic() + 10  # the guest's serial port drains after the answer
    while marker not in console.read_text(errors="replace"):
        assert time.monotonic() < deadline, console.read_text(errors="replace")[-2000:]
        await asyncio.sleep(0.2)
    assert "started process" in console.read_text(errors="replace")
    assert await envd.sh("ls /var/log/envd.log 2>/dev/null || echo none") == "none\n"
