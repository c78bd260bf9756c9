"""Reliability of the capsule lifecycle, on real VMs (issue 4's list)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from backend.capsules.errors import CapsuleError, CapsuleNotFound, IllegalTransition
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import State
from backend.capsules.watchdog import Watchdog
from backend.config import Paths
from backend.sparse import sha256_file, sparse_checksum
from tests.integration.conftest import sh

pytestmark = pytest.mark.vm


async def test_twenty_pause_resume_cycles_lose_no_write(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    for i in range(20):
        await sh(manager, capsule.id, f"echo line-{i} >> /root/log && echo {i} > /root/file-{i}")
        snapshot = await manager.pause(capsule.id)
        assert snapshot.generation == i + 1
        assert manager.get(capsule.id).state == State.PAUSED
        await manager.resume(capsule.id)
    lines = (await sh(manager, capsule.id, "cat /root/log")).split()
    assert lines == [f"line-{i}" for i in range(20)]
    files = await sh(manager, capsule.id, "for i in $(seq 0 19); do cat /root/file-$i; done")
    assert files.split() == [str(i) for i in range(20)]
    # only the latest generation is kept on disk
    generations = sorted(p.name for p in manager.layout.snapshot_dir(capsule.id).iterdir())
    assert generations == ["gen-000020"]


AGENT = textwrap.dedent("""
    import asyncio, json, sys
    from backend.capsules.manager import CapsuleManager
    from backend.config import Paths
    from pathlib import Path

    async def main():
        root = Path(sys.argv[1])
        paths = Paths(data=Path(sys.argv[2]), state=root / "state", cache=Path(sys.argv[3]),
                      config=root / "config", shm=Path("/dev/shm"))
        m = CapsuleManager(paths)
        await m.start()
        a, b, c = await asyncio.gather(m.create(), m.create(), m.create())
        await m.exec(c.id, "echo kept-across-kill > /root/data")
        await m.pause(c.id)
        print(json.dumps({"running": [a.id, b.id], "paused": c.id}), flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_sigkilled_agent_loses_nothing(paths: Paths, short_tmp: Path) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-c", AGENT, str(short_tmp), str(paths.data), str(paths.cache)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[2],
    )
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(agent.stdout.readline), 300)
        ids = json.loads(line)
    finally:
        agent.send_signal(signal.SIGKILL)
        agent.wait()
    manager = CapsuleManager(paths)
    try:
        capsules = {c.id: c for c in await manager.start(watchdog=False)}
        for running in ids["running"]:
            assert capsules[running].state == State.RUNNING
            assert (await sh(manager, running, "echo alive")).strip() == "alive"
        assert capsules[ids["paused"]].state == State.PAUSED
        await manager.resume(ids["paused"])
        assert (await sh(manager, ids["paused"], "cat /root/data")).strip() == "kept-across-kill"
    finally:
        await manager.close()
        from tests.integration.conftest import destroy_all

        await destroy_all(paths)


async def test_killed_qemu_shows_error_and_destroy_cleans_up(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    assert capsule.pid is not None
    os.kill(capsule.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while manager.get(capsule.id).state != State.ERROR:
        await Watchdog(manager).check()
        assert time.monotonic() < deadline, "the dead VM was never noticed"
        await asyncio.sleep(0.2)
    broken = manager.get(capsule.id)
    assert "QEMU exited unexpectedly" in broken.reason
    with pytest.raises(IllegalTransition):
        await manager.pause(capsule.id)
    await manager.destroy(capsule.id)
    assert not manager.layout.run_dir(capsule.id).exists()
    assert not manager.layout.ram_file(capsule.id).exists()
    with pytest.raises(CapsuleNotFound):
        manager.get(capsule.id)


async def test_pause_out_of_space_keeps_running_and_keeps_last_generation(
    paths: Paths, short_tmp: Path
) -> None:
    mount = paths.snapshots
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=360m,mode=0700", "tmpfs", str(mount)], check=True
    )
    manager = CapsuleManager(paths)
    await manager.start(watchdog=False)
    try:
        capsule = await manager.create()
        await sh(manager, capsule.id, "echo first > /root/first")
        first = await manager.pause(capsule.id)
        await manager.resume(capsule.id)
        # room for one more generation of the same size, and 40 MB more
        size_kib = (2 * first.total_allocated + (40 << 20)) >> 10
        subprocess.run(["mount", "-o", f"remount,size={size_kib}k", str(mount)], check=True)
        # 140 MB in the guest's RAM that no cache drop can free
        await sh(
            manager,
            capsule.id,
            "mount -o remount,size=180m /dev/shm && "
            "head -c 140000000 /dev/urandom > /dev/shm/ballast",
        )
        with pytest.raises(CapsuleError) as info:
            await manager.pause(capsule.id)
        assert "no space left" in str(info.value)
        assert manager.get(capsule.id).state == State.RUNNING
        assert (await sh(manager, capsule.id, "cat /root/first")).strip() == "first"
        gen = Path(first.path)
        assert sorted(p.name for p in mount.joinpath(capsule.id).iterdir()) == [gen.name]
        if first.ram_sha256:
            assert sparse_checksum(gen / "mem") == first.ram_sha256
        else:  # a clone's generation: its RAM is the pages in vmstate over its base
            assert sha256_file(gen / "vmstate") == first.state_sha256
        # with the ballast gone the next pause fits, and the capsule comes back intact
        await sh(manager, capsule.id, "rm /dev/shm/ballast")
        await manager.pause(capsule.id)
        await manager.resume(capsule.id)
        assert (await sh(manager, capsule.id, "cat /root/first")).strip() == "first"
    finally:
        await manager.close()
        from tests.integration.conftest import destroy_all

        await destroy_all(paths)
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_tampered_snapshot_is_refused_and_bad_transitions_are_clear(
    manager: CapsuleManager,
) -> None:
    capsule = await manager.create()
    with pytest.raises(IllegalTransition, match="running"):
        await manager.resume(capsule.id)
    snapshot = await manager.pause(capsule.id)
    with pytest.raises(IllegalTransition, match="paused"):
        await manager.pause(capsule.id)
    # a clone's generation is a diff: its pages and device state are in vmstate
    assert not (Path(snapshot.path) / "mem").exists()
    state = Path(snapshot.path) / "vmstate"
    with state.open("r+b") as f:
        f.seek(4096)
        byte = f.read(1)
        f.seek(4096)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(CapsuleError, match="checksum"):
        await manager.resume(capsule.id)
    assert manager.get(capsule.id).state == State.PAUSED
    assert not manager.layout.ram_file(capsule.id).exists()
    await manager.destroy(capsule.id)
    with pytest.raises(CapsuleNotFound):
        await manager.destroy(capsule.id)
    with pytest.raises(CapsuleNotFound):
        await manager.resume("cl-doesnotexist")
