"""Boot smoke test: the built image boots under QEMU and envd answers over the port forward."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.envd import protocol as wire
from backend.runtime.accel import probe_accel

pytestmark = pytest.mark.vm


async def test_image_boots_and_envd_answers_on_loopback(manager: CapsuleManager) -> None:
    capsule = await manager.create(memory_mib=256, cold=True)
    assert capsule.state == State.RUNNING
    assert capsule.extra["start"] == "cold"
    async with httpx.AsyncClient() as client:
        health = await client.get(f"http://127.0.0.1:{capsule.host_port}/health")
        assert health.status_code == 200
        assert "version" in health.json()
        # the guest's own kernel answers, not something on the host
        result = await manager.exec(capsule.id, "uname -r; cat /proc/1/cmdline | tr '\\0' ' '")
        assert result.exit_code == 0
        release, init = result.stdout.splitlines()
        assert release.endswith("-cloud-amd64")
        assert init.rstrip().endswith("/.wrenn/init")  # PID 1 from the agent disk
    # the forward listens on loopback only
    ss = subprocess.run(
        ["ss", "-ltnH", f"sport = :{capsule.host_port}"], capture_output=True, text=True
    )
    assert f"127.0.0.1:{capsule.host_port}" in ss.stdout
    assert f"0.0.0.0:{capsule.host_port}" not in ss.stdout


async def test_metadata_channel_reaches_the_guest(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    result = await manager.exec(capsule.id, f"cat {wire.METADATA_GUEST_PATH}")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["instanceID"] == capsule.id


def test_doctor_reports_the_accelerator_actually_used(built_image: object) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tui", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"], result.stdout
    accel = next(c for c in report["checks"] if c["name"] == "accel")
    probe = probe_accel(None, use_cache=True)
    if probe.kvm_usable:
        assert accel["detail"].startswith("KVM usable")
    else:
        assert "using TCG" in accel["detail"]
