"""The headless CLI on the same API, while another agent process (a dashboard) runs."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.config import Paths

pytestmark = pytest.mark.vm


async def wrenn(paths: Paths, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "WRENN_STATE_DIR": str(paths.state), "WRENN_CONFIG_DIR": str(paths.config)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tui",
        *args,
        env=env,
        cwd=Path(__file__).parents[2],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_cli_lifecycle_while_a_dashboard_agent_runs(
    manager: CapsuleManager, paths: Paths
) -> None:
    # `manager` plays the dashboard: started, watching, holding the same state dir
    await manager.start(watchdog=True)
    code, out, err = await wrenn(paths, "capsule", "create", "--json")
    assert code == 0, err
    capsule_id = json.loads(out)["id"]
    assert "access_token" not in json.loads(out), "the CLI must not print the token"

    code, out, err = await wrenn(
        paths, "capsule", "exec", capsule_id, "--", "sh", "-c", "echo hi; echo oops >&2; exit 3"
    )
    assert (code, out, err) == (3, "hi\n", "oops\n")

    code, out, _ = await wrenn(paths, "capsule", "pause", capsule_id)
    assert code == 0 and "paused" in out
    assert manager.get(capsule_id).state == State.PAUSED  # the dashboard's view agrees
    code, _, err = await wrenn(paths, "capsule", "pause", capsule_id)
    assert code == 1 and "cannot pause" in err

    code, out, _ = await wrenn(paths, "capsule", "resume", capsule_id)
    assert code == 0
    code, out, _ = await wrenn(paths, "capsule", "list", "--json")
    assert [c["state"] for c in json.loads(out) if c["id"] == capsule_id] == ["running"]

    code, out, _ = await wrenn(paths, "capsule", "metrics", capsule_id, "--json")
    assert code == 0, out
    code, _, _ = await wrenn(paths, "capsule", "destroy", capsule_id)
    assert code == 0
    code, _, err = await wrenn(paths, "capsule", "get", capsule_id)
    assert code == 1 and "no capsule" in err
