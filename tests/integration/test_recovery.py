"""Issue 16 items 9 and 12 on real VMs (tests/unit/test_manager_failures.py drives the same
paths with a fake runtime): a paused capsule whose forward port another process took resumes on
a new port; an agent killed mid-pause (vCPUs stopped, balloon inflated, envd holding its
reclaimer) leaves a capsule the next start runs again with everything undone."""

from __future__ import annotations

import asyncio
import socket

import pytest

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.config import Paths
from tests.integration.conftest import manager, sh

__all__ = ["manager"]

pytestmark = pytest.mark.vm


async def test_resume_takes_a_new_port_when_the_old_one_was_taken(
    manager: CapsuleManager,
) -> None:
    capsule = await manager.create()
    await sh(manager, capsule.id, "echo kept > /root/port.txt")
    await manager.pause(capsule.id)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", capsule.host_port))
    squatter.listen()
    try:
        resumed = await manager.resume(capsule.id)
        assert resumed.state == State.RUNNING and resumed.host_port != capsule.host_port
        assert (await sh(manager, capsule.id, "cat /root/port.txt")).strip() == "kept"
    finally:
        squatter.close()
    assert any(e.kind == "port" for e in manager.events(capsule.id))


async def test_agent_killed_mid_pause_leaves_a_capsule_the_next_start_runs_again(
    manager: CapsuleManager, paths: Paths
) -> None:
    capsule = await manager.create()
    await sh(manager, capsule.id, "echo before > /root/mid.txt")
    full = capsule.memory_mib << 20
    vm = manager.vm(capsule)
    assert vm is not None
    # what a pause has done when its agent is killed before the device state is saved
    async with manager.envd(capsule) as envd:
        assert (await envd.snapshot_prepare())["snapshot_in_progress"] is True
    async with vm.session():
        await vm.balloon_set(full // 2)
        for _ in range(100):
            if await vm.balloon_actual() < full:
                break
            await asyncio.sleep(0.1)
        await vm.stop()
    manager.save(manager.get(capsule.id).with_(state=State.PAUSING))
    await manager.close()

    restarted = CapsuleManager(paths)
    try:
        await restarted.start(watchdog=False)
        after = restarted.get(capsule.id)
        assert after.state == State.RUNNING and after.pid == capsule.pid
        assert (await sh(restarted, capsule.id, "cat /root/mid.txt")).strip() == "before"
        async with restarted.envd(after) as envd:
            assert (await envd.metrics())["snapshot_in_progress"] is False
        again = restarted.vm(after)
        assert again is not None
        async with again.session():
            for _ in range(100):
                if await again.balloon_actual() == full:
                    break
                await asyncio.sleep(0.1)
            assert await again.balloon_actual() == full
        # and it pauses and resumes as any other
        await restarted.pause(capsule.id)
        await restarted.resume(capsule.id)
        assert (await sh(restarted, capsule.id, "cat /root/mid.txt")).strip() == "before"
    finally:
        await restarted.close()
