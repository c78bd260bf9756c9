"""Failure paths of create, pause, resume and re-adoption, driven through the runtime and envd
interfaces with fakes (tests/unit/fakes.py): each ends in a usable, consistent capsule and no
VM left behind. The same paths with real QEMU are in tests/integration."""

from __future__ import annotations

import socket
import sqlite3
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from backend.capsules.envd_client import EnvdError
from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from backend.capsules.store import Store
from backend.config import Paths
from backend.runtime.base import VMMCommandError, VMMGone
from tests.unit.fakes import FakeEnvds, FakeRuntime, FakeVM


class Fakes:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.runtime = FakeRuntime()
        self.envds = FakeEnvds()

    def manager(self) -> CapsuleManager:
        return CapsuleManager(self.paths, runtime=self.runtime, envd=self.envds)

    def vm(self, capsule: Capsule) -> FakeVM:
        assert capsule.pid is not None
        return self.runtime.vms[capsule.pid]

    def guest(self, capsule: Capsule) -> Any:
        return self.envds.guests[capsule.envd_url]


@pytest.fixture
def fakes(paths: Paths) -> Fakes:
    return Fakes(paths)


@pytest.fixture
async def manager(fakes: Fakes) -> AsyncIterator[CapsuleManager]:
    m = fakes.manager()
    await m.start(watchdog=False)
    try:
        yield m
    finally:
        await m.close()


async def test_fakes_drive_the_whole_lifecycle(manager: CapsuleManager, fakes: Fakes) -> None:
    capsule = await manager.create(cold=True)
    assert capsule.state == State.RUNNING and fakes.guest(capsule).token == capsule.access_token
    snap = await manager.pause(capsule.id)
    assert snap.generation == 1 and manager.layout.generation_ready(capsule.id, 1)
    assert fakes.runtime.live() == []
    resumed = await manager.resume(capsule.id)
    assert resumed.state == State.RUNNING
    assert [vm.pid for vm in fakes.runtime.live()] == [resumed.pid]
    # the restored guest got a fresh /init: its token, new entropy
    inits = fakes.guest(resumed).inits
    assert len(inits) == 2 and inits[0]["entropy"] != inits[1]["entropy"]


async def test_failed_device_state_save_keeps_the_capsule_running(
    manager: CapsuleManager, fakes: Fakes
) -> None:
    capsule = await manager.create(cold=True)
    fakes.runtime.faults.arm(
        "snapshot_create", VMMCommandError("migrate", "GenericError", "disk full")
    )
    with pytest.raises(CapsuleError, match="disk full"):
        await manager.pause(capsule.id)
    after = manager.get(capsule.id)
    assert after.state == State.RUNNING and after.generation == 0 and after.pid == capsule.pid
    vm, guest = fakes.vm(capsule), fakes.guest(capsule)
    assert vm.running, "the vCPUs were left stopped"
    assert vm.balloon == capsule.memory_mib << 20, "the balloon was left inflated"
    assert not guest.holding, "envd's snapshot hold was left on"
    assert not manager.layout.snapshot_dir(capsule.id).exists() or not any(
        manager.layout.snapshot_dir(capsule.id).iterdir()
    )
    # and it pauses fine next time
    assert (await manager.pause(capsule.id)).generation == 1


async def test_vmm_dying_during_pause_is_an_error_with_the_reason(
    manager: CapsuleManager, fakes: Fakes
) -> None:
    capsule = await manager.create(cold=True)
    vm = fakes.vm(capsule)

    async def die() -> None:
        vm.kill()
        raise VMMGone(f"QEMU (pid {vm.pid}) is gone")

    vm.stop = die  # type: ignore[method-assign]
    with pytest.raises(CapsuleError, match="is gone"):
        await manager.pause(capsule.id)
    after = manager.get(capsule.id)
    assert after.state == State.ERROR and "is gone" in after.reason and after.pid is None
    await manager.destroy(capsule.id)
    assert manager.list_capsules() == []


def _fail_puts(
    manager: CapsuleManager, monkeypatch: pytest.MonkeyPatch, when: Any, times: int
) -> list[int]:
    real = manager.store.put
    failed = [0]

    def put(capsule: Capsule) -> None:
        if when(capsule) and failed[0] < times:
            failed[0] += 1
            raise sqlite3.OperationalError("database is locked")
        real(capsule)

    monkeypatch.setattr(manager.store, "put", put)
    return failed


async def test_database_error_after_the_generation_is_durable(
    manager: CapsuleManager, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    capsule = await manager.create(cold=True)
    # one failed write: retried, the capsule is paused
    failed = _fail_puts(manager, monkeypatch, lambda c: c.state == State.PAUSED, 1)
    await manager.pause(capsule.id)
    assert failed[0] == 1 and manager.get(capsule.id).state == State.PAUSED
    monkeypatch.undo()
    await manager.resume(capsule.id)

    # every write fails: a clear error; the next start records it paused on that generation
    failed = _fail_puts(manager, monkeypatch, lambda c: c.state == State.PAUSED, 99)
    with pytest.raises(CapsuleError, match="generation 2 is on disk"):
        await manager.pause(capsule.id)
    monkeypatch.undo()
    assert fakes.runtime.live() == []
    restarted = fakes.manager()
    await restarted.start(watchdog=False)
    try:
        after = restarted.get(capsule.id)
        assert after.state == State.PAUSED and after.generation == 2
        assert (await restarted.resume(capsule.id)).state == State.RUNNING
    finally:
        await restarted.close()


async def test_database_error_right_after_the_vmm_starts_leaves_no_vm(
    manager: CapsuleManager, fakes: Fakes, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_puts(manager, monkeypatch, lambda c: c.pid is not None, 1)
    with pytest.raises(sqlite3.OperationalError):
        await manager.create(cold=True)
    assert fakes.runtime.live() == [], "a QEMU nobody recorded runs on"


@pytest.mark.parametrize(
    "fault",
    [
        ("runtime", "restore", VMMCommandError("migrate-incoming", "GenericError", "bad state")),
        ("envd", "init", EnvdError("init: 500")),
        ("envd", "health", EnvdError("envd did not answer in time")),
    ],
    ids=["restore", "init", "health"],
)
async def test_failed_resume_leaves_the_capsule_paused(
    manager: CapsuleManager, fakes: Fakes, fault: tuple[str, str, Exception]
) -> None:
    capsule = await manager.create(cold=True)
    await manager.pause(capsule.id)
    where, what, exc = fault
    (fakes.runtime.faults if where == "runtime" else fakes.envds.faults).arm(what, exc)
    with pytest.raises(CapsuleError, match="resume failed"):
        await manager.resume(capsule.id)
    after = manager.get(capsule.id)
    assert after.state == State.PAUSED and after.pid is None and after.generation == 1
    assert manager.layout.generation_ready(capsule.id, 1)
    assert fakes.runtime.live() == []
    assert (await manager.resume(capsule.id)).state == State.RUNNING
    assert len(fakes.runtime.live()) == 1


async def test_resume_moves_off_a_port_taken_meanwhile(manager: CapsuleManager) -> None:
    capsule = await manager.create(cold=True)
    await manager.pause(capsule.id)
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", capsule.host_port))
    squatter.listen()
    try:
        resumed = await manager.resume(capsule.id)
    finally:
        squatter.close()
    assert resumed.state == State.RUNNING and resumed.host_port != capsule.host_port
    assert any(e.kind == "port" for e in manager.events(capsule.id))


async def test_restart_mid_pause_runs_the_guest_again(
    manager: CapsuleManager, fakes: Fakes
) -> None:
    """An agent killed after stopping the vCPUs with the balloon inflated and envd holding its
    reclaimer: the next start continues the VM, deflates the balloon, releases the hold."""
    capsule = await manager.create(cold=True)
    vm, guest = fakes.vm(capsule), fakes.guest(capsule)
    guest.holding, vm.balloon, vm.running = True, 64 << 20, False
    manager.save(capsule.with_(state=State.PAUSING))
    await manager.close()

    restarted = fakes.manager()
    await restarted.start(watchdog=False)
    try:
        after = restarted.get(capsule.id)
        assert after.state == State.RUNNING and after.pid == capsule.pid
        assert vm.running and vm.balloon == capsule.memory_mib << 20 and not guest.holding
    finally:
        await restarted.close()


async def test_restart_after_vmm_died_marks_error(manager: CapsuleManager, fakes: Fakes) -> None:
    capsule = await manager.create(cold=True)
    fakes.vm(capsule).kill()
    await manager.close()
    restarted = fakes.manager()
    await restarted.start(watchdog=False)
    try:
        after = restarted.get(capsule.id)
        assert after.state == State.ERROR and f"pid {capsule.pid}" in after.reason
    finally:
        await restarted.close()


async def test_restart_completes_an_unfinished_start(manager: CapsuleManager, fakes: Fakes) -> None:
    """Killed between the VM's start and envd's /init: the next start gives the capsule its
    token (envd must not stay open to the snapshot's token)."""
    capsule = await manager.create(cold=True)
    guest = fakes.guest(capsule)
    old = guest.token
    guest.token = "the-template-token"
    manager.save(
        capsule.with_(state=State.PENDING, extra={**capsule.extra, "init_token": guest.token})
    )
    await manager.close()
    restarted = fakes.manager()
    await restarted.start(watchdog=False)
    try:
        after = restarted.get(capsule.id)
        assert after.state == State.RUNNING and guest.token == old == after.access_token
    finally:
        await restarted.close()


def test_touch_never_writes_over_a_state_committed_meanwhile(paths: Paths) -> None:
    """`touch` reads and writes in one transaction: while another process holds the write
    lock to pause the capsule, touch waits, then sees `paused` and leaves it."""
    a, b = Store(paths.database), Store(paths.database)
    capsule = Capsule(
        id="cl-touchrace",
        state=State.RUNNING,
        template="default",
        image_dir="/nonexistent",
        memory_mib=256,
        vcpus=1,
        created_at=0.0,
        host_port=1,
        access_token="t",
    )
    a.put(capsule)
    assert a.get(capsule.id) is not None
    b._db.execute("BEGIN IMMEDIATE")
    result: list[bool] = []

    def touch() -> None:
        mine = Store(paths.database)
        result.append(mine.touch(capsule.id, 123.0))
        mine.close()

    toucher = threading.Thread(target=touch)
    toucher.start()
    toucher.join(0.3)
    assert toucher.is_alive(), "touch did not wait for the other writer"
    b.put(capsule.with_(state=State.PAUSED))
    b._db.execute("COMMIT")
    toucher.join(10)
    assert result == [False]
    after = b.get(capsule.id)
    assert after is not None and after.state == State.PAUSED and after.last_activity != 123.0
    a.close()
    b.close()
