"""Issue 16 item 2 in real VMs: envd in a capsule is never open without a token. A cold-booted
envd takes the token the host put in its metadata before it answers anything; the template
snapshot every warm capsule starts from holds a secret only the host keeps (0600); and a
capsule's token change closes a terminal opened under the old one."""

from __future__ import annotations

import asyncio
import json
import secrets
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from backend.capsules.disks import make_overlay
from backend.capsules.manager import CapsuleManager
from backend.capsules.snapshots import DiskFrom, SnapshotManifest, restore
from backend.capsules.templates import snapshot_key
from backend.runtime.base import VM, VMConfig
from backend.runtime.ports import free_port
from backend.runtime.qemu import QemuRuntime, metadata_blob
from backend.sparse import create_holes
from tests.integration.conftest import manager

__all__ = ["manager"]

pytestmark = pytest.mark.vm


def _config(
    m: CapsuleManager, work: Path, image: Path, memory_mib: int, accel: str, token: str
) -> VMConfig:
    return VMConfig(
        capsule_id=f"sec-{secrets.token_hex(3)}",
        run_dir=work / "run",
        kernel=image / "vmlinux",
        initrd=image / "initrd.cpio.gz",
        disk=work / "disk.qcow2",
        ram_file=m.layout.ensure_ram_dir() / f"sec-{secrets.token_hex(8)}.mem",
        memory_mib=memory_mib,
        vcpus=1,
        host_port=free_port(),
        metadata_json=json.dumps({"instanceID": "cl-sec", "accessToken": token}),
        accel=accel,
        network="none",
        agent_disk=m.layout.agent_disk(image),
    )


async def _wait_health(url: str, vm: VM) -> None:
    async with httpx.AsyncClient(trust_env=False, timeout=2) as c:
        for _ in range(600):
            assert vm.alive(), "the VM exited"
            try:
                if (await c.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("envd never answered /health")


async def _status(url: str, path: str, token: str | None = None) -> int:
    headers = {"X-Access-Token": token} if token else {}
    async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
        return (await c.get(f"{url}{path}", headers=headers)).status_code


async def test_envd_in_a_capsule_is_never_tokenless(
    manager: CapsuleManager, short_tmp: Path
) -> None:
    capsule = await manager.create()
    image = Path(capsule.image_dir)
    accel = capsule.accel

    # The warm snapshot: a token the host keeps, in a manifest only the agent can read.
    key = snapshot_key(capsule.memory_mib, capsule.vcpus, accel, capsule.network)
    directory = manager.warm.directory(image, key)
    snap = SnapshotManifest.load(directory)
    assert snap is not None and snap.envd_token, "the template snapshot holds no envd token"
    mode = stat.S_IMODE((directory / "snapshot.json").stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert snap.envd_token not in (image / "manifest.json").read_text()

    # That snapshot restored with no /init at all: closed to everyone without its token.
    runtime = QemuRuntime(accel)
    work = short_tmp / "warm"
    work.mkdir()
    config = _config(manager, work, image, capsule.memory_mib, accel, "metadata-token")
    config.run_dir.mkdir(mode=0o700)
    vm, _ = await restore(runtime, config, snap, DiskFrom(), "the template snapshot")
    try:
        url = f"http://127.0.0.1:{config.host_port}"
        await _wait_health(url, vm)
        assert await _status(url, "/metrics") == 401
        assert await _status(url, "/metrics", "metadata-token") == 401
        assert await _status(url, "/metrics", snap.envd_token) == 200
    finally:
        vm.kill()
        await vm.wait_exit(10)
        config.ram_file.unlink(missing_ok=True)

    # A cold boot, no /init ever sent: the metadata's token is in force from the start.
    work = short_tmp / "cold"
    work.mkdir()
    config = _config(manager, work, image, capsule.memory_mib, accel, "cold-token")
    config.run_dir.mkdir(mode=0o700)
    await make_overlay(image / "rootfs.ext4", config.disk)
    create_holes(config.ram_file, capsule.memory_mib << 20)
    vm = await runtime.create(config)
    try:
        url = f"http://127.0.0.1:{config.host_port}"
        await _wait_health(url, vm)
        for path in ("/metrics", "/files?path=/etc/hostname", "/processes"):
            assert await _status(url, path) in (401, 503), path
        assert await _status(url, "/metrics", "cold-token") == 200
        # The token is not on QEMU's command line (every local user can read that).
        cmdline = Path(f"/proc/{vm.pid}/cmdline").read_bytes()
        assert b"cold-token" not in cmdline
        # Nor in its environment; the fw_cfg file holding it is readable by the agent only.
        assert b"cold-token" not in Path(f"/proc/{vm.pid}/environ").read_bytes()
        blob = metadata_blob(config)
        assert b"cold-token" in blob.read_bytes()
        assert blob.stat().st_mode & 0o777 == 0o600
        peek = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat", blob],
            capture_output=True,
        )
        assert peek.returncode != 0 and b"cold-token" not in peek.stdout
    finally:
        vm.kill()
        await vm.wait_exit(10)
        config.ram_file.unlink(missing_ok=True)

    # The capsule itself: a terminal opened under its token ends when the token changes.
    ws_url = f"ws://127.0.0.1:{capsule.host_port}/pty"
    old = {"X-Access-Token": capsule.access_token}
    async with connect(ws_url, additional_headers=old) as ws:
        await ws.send(json.dumps({"type": "start", "tag": "sec", "cols": 80, "rows": 24}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 30))["type"] == "started"
        async with httpx.AsyncClient(trust_env=False, timeout=30) as c:
            rotated = await c.post(
                f"{capsule.envd_url}/init", json={"accessToken": "rotated"}, headers=old
            )
            assert rotated.status_code == 200
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await ws.recv()
