"""Issue 16 item 10: QEMU runs under seccomp (`-sandbox on`) and, when the agent is root, as
the unprivileged `wrenn-qemu` user, and capsules still boot, serve metadata, pause and
resume (real VMs)."""

from __future__ import annotations

import json
import pwd
from pathlib import Path

import pytest

from backend.capsules.manager import CapsuleManager
from backend.envd import protocol as wire
from backend.runtime.qemu import QEMU_USER
from tests.integration.conftest import manager

__all__ = ["manager"]

pytestmark = pytest.mark.vm

READ_METADATA = f"cat {wire.METADATA_GUEST_PATH}"


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def assert_confined(pid: int | None) -> None:
    assert pid is not None
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"-sandbox" in cmdline
    info = status(pid)
    assert info["Seccomp"] == "2", info["Seccomp"]  # a filter is installed
    uid = pwd.getpwnam(QEMU_USER).pw_uid
    assert info["Uid"].split() == [str(uid)] * 4, info["Uid"]
    assert info["Gid"].split()[0] != "0", info["Gid"]


async def test_qemu_runs_confined_and_capsules_still_work(manager: CapsuleManager) -> None:
    try:
        pwd.getpwnam(QEMU_USER)
    except KeyError:
        pytest.fail(f"no user {QEMU_USER}: run scripts/setup.sh (it creates it)")
    capsule = await manager.create()
    assert_confined(capsule.pid)
    meta = await manager.exec(capsule.id, READ_METADATA)
    assert json.loads(meta.stdout)["instanceID"] == capsule.id
    await manager.pause(capsule.id)
    resumed = await manager.resume(capsule.id)
    assert_confined(resumed.pid)
    assert (await manager.exec(capsule.id, "echo alive")).stdout == "alive\n"
    meta = await manager.exec(capsule.id, READ_METADATA)
    assert json.loads(meta.stdout)["instanceID"] == capsule.id
