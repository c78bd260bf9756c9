"""The Wrenn API layer's overhead: the same operations through the unmodified Wrenn SDK (over
``wrenn-tui serve``) and through the CLI (``wrenn-tui capsule ...``), in one run, on one
private state dir.

    python -m bench.wrenn_api [--cycles 3] [--port 44090]

Prints one JSON object: per operation the median seconds through the SDK, the CLI, and the
CapsuleManager called in this process (the floor under both), and the API's overhead (SDK minus
manager). The SDK times are wall-clock in the SDK's own process (HTTP + the API + the manager);
the CLI times include the CLI process's start (what a person typing it waits for).
``create_snapshot`` has no CLI command here. ``get_info`` (20 per cycle) is a request that
reaches no VM: the API layer alone (against a SQLite read in the manager).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule
from backend.config import default_paths
from backend.envd.protocol import auth_headers
from tests.wrenn.sdk_venv import ensure_sdk_venv

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = ("create", "run_echo", "get_info", "pause", "resume", "create_snapshot")
WRENN_TUI = str(Path(sys.executable).with_name("wrenn-tui"))

SDK_TIMINGS = r"""
import json, sys, time
from wrenn import Capsule
cycles, first = int(sys.argv[1]), int(sys.argv[2])
out = {k: [] for k in ("create", "run_echo", "get_info", "pause", "resume", "create_snapshot")}
for i in range(first, first + cycles):
    def timed(name, call):
        t = time.monotonic(); value = call(); out[name].append(time.monotonic() - t)
        return value
    c = timed("create", lambda: Capsule.create(wait=True))
    assert timed("run_echo", lambda: c.commands.run("echo hi")).stdout == "hi\n"
    for _ in range(20):
        timed("get_info", c.get_info)
    timed("pause", lambda: c.pause(wait=True))
    timed("resume", lambda: c.resume(wait=True))
    timed("create_snapshot", lambda: c.create_snapshot(f"bench-sdk-{i}"))
    c._client.snapshots.delete(f"bench-sdk-{i}")
    c.destroy(wait=True)
print(json.dumps(out))
"""


def cli(env: dict[str, str], *args: str) -> tuple[float, str]:
    started = time.monotonic()
    result = subprocess.run(
        [WRENN_TUI, *args], env=env, capture_output=True, text=True, timeout=300, check=True
    )
    return time.monotonic() - started, result.stdout


def cli_timings(env: dict[str, str], cycles: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {k: [] for k in ("create", "run_echo", "pause", "resume")}
    for _ in range(cycles):
        seconds, text = cli(env, "capsule", "create", "--json")
        out["create"].append(seconds)
        capsule_id = json.loads(text)["id"]
        seconds, text = cli(env, "capsule", "exec", capsule_id, "--", "echo", "hi")
        out["run_echo"].append(seconds)
        assert "hi" in text, text
        out["pause"].append(cli(env, "capsule", "pause", capsule_id)[0])
        out["resume"].append(cli(env, "capsule", "resume", capsule_id)[0])
        cli(env, "capsule", "destroy", capsule_id)
    return out


async def sh_echo(capsule: Capsule) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.post(
            capsule.envd_url + "/exec",
            json={"argv": ["/bin/sh", "-c", "echo hi"], "timeout": 30},
            headers=auth_headers(capsule.access_token),
        )
        result: dict[str, Any] = response.json()
        return result


async def manager_timings(cycles: int, first: int = 0) -> dict[str, list[float]]:
    """The same operations on CapsuleManager in this process: the floor under both."""
    manager = CapsuleManager(default_paths())
    await manager.start(watchdog=False)
    out: dict[str, list[float]] = {k: [] for k in OPERATIONS}

    async def timed(name: str, call: Any) -> Any:
        started = time.monotonic()
        value = await call
        out[name].append(time.monotonic() - started)
        return value

    try:
        for i in range(first, first + cycles):
            capsule = await timed("create", manager.create())
            # what the SDK's run asks envd for (the CLI's exec is `bash -l -c`: slower)
            result = await timed("run_echo", sh_echo(capsule))
            assert result["stdout"] == "hi\n", result
            for _ in range(20):
                started = time.monotonic()
                manager.get(capsule.id)
                out["get_info"].append(time.monotonic() - started)
            await timed("pause", manager.pause(capsule.id))
            await timed("resume", manager.resume(capsule.id))
            await timed("create_snapshot", manager.template_create(capsule.id, f"bench-m-{i}"))
            await manager.template_remove(f"bench-m-{i}")
            await manager.destroy(capsule.id)
    finally:
        await manager.close()
    return out


def wait_listening(url: str, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"wrenn-tui serve did not answer on {url}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cycles", type=int, default=3)
    parser.add_argument("--port", type=int, default=44090)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="wb-", dir="/tmp"))
    env = {
        **os.environ,
        "WRENN_STATE_DIR": str(root / "state"),
        "WRENN_CONFIG_DIR": str(root / "config"),
    }
    os.environ.update(
        WRENN_STATE_DIR=env["WRENN_STATE_DIR"], WRENN_CONFIG_DIR=env["WRENN_CONFIG_DIR"]
    )
    python = ensure_sdk_venv()
    url = f"http://127.0.0.1:{args.port}"
    server = subprocess.Popen(
        [WRENN_TUI, "serve", "--port", str(args.port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    sdk: dict[str, list[float]] = {k: [] for k in OPERATIONS}
    by_cli: dict[str, list[float]] = {k: [] for k in OPERATIONS if k != "create_snapshot"}
    direct: dict[str, list[float]] = {k: [] for k in OPERATIONS}
    try:
        wait_listening(url)
        key = cli(env, "api-key")[1].strip()
        sdk_env = {**env, "WRENN_API_KEY": key, "WRENN_BASE_URL": url, "NO_PROXY": "127.0.0.1"}
        # One cycle of each path in turn, so a change in the shared machine's load falls on
        # all three alike.
        for cycle in range(args.cycles):
            done = subprocess.run(
                [str(python), "-c", SDK_TIMINGS, "1", str(cycle)],
                env=sdk_env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            if done.returncode != 0:
                raise RuntimeError(f"the SDK run failed:\n{done.stderr}")
            for name, values in json.loads(done.stdout.strip().splitlines()[-1]).items():
                sdk[name] += values
            for name, values in cli_timings(env, 1).items():
                by_cli[name] += values
            for name, values in asyncio.run(manager_timings(1, cycle)).items():
                direct[name] += values
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    result: dict[str, Any] = {"cycles": args.cycles, "unit": "s (median)", "operations": {}}
    for name in OPERATIONS:
        sdk_s = statistics.median(sdk[name])
        manager_s = statistics.median(direct[name])
        row: dict[str, Any] = {"sdk": round(sdk_s, 4)}
        if by_cli.get(name):
            row["cli"] = round(statistics.median(by_cli[name]), 3)
        row["manager"] = round(manager_s, 4)
        row["api_overhead_s"] = round(sdk_s - manager_s, 4)
        result["operations"][name] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
