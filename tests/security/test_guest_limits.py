"""Issue 16 item 11: a guest cannot grow host resources without bound: the console log is
capped and rotated (a real VM writing its serial port), every envd answer the host reads
whole is capped, and reading the metadata starts no host process (it is a fw_cfg file, not a
network address whose every connection forked a command)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backend.capsules.envd_client import EnvdClient, EnvdError
from backend.capsules.manager import CapsuleManager
from backend.capsules.watchdog import Watchdog
from backend.envd import protocol as wire
from backend.runtime.base import VMConfig, VMMError
from backend.runtime.logs import CONSOLE_MAX
from backend.runtime.qemu import build_argv, metadata_blob, write_metadata_blob
from tests.integration.conftest import manager
from tests.vmconfig import paper_config

from .listeners import RecordingListener

__all__ = ["manager"]


async def test_envd_answers_the_host_reads_are_capped() -> None:
    body = b'{"cpu_count": 1, "pad": "' + b"x" * (wire.MAX_SMALL_BODY + 10) + b'"}'
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    with RecordingListener(answer=answer) as guest:
        async with EnvdClient(f"http://127.0.0.1:{guest.port}", "t", timeout=10) as client:
            with pytest.raises(EnvdError, match="larger than"):
                await client.metrics(timeout=10)
    not_json = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n[[[[["
    with RecordingListener(answer=not_json) as guest:
        async with EnvdClient(f"http://127.0.0.1:{guest.port}", "t", timeout=10) as client:
            with pytest.raises(EnvdError, match="not JSON"):
                await client.metrics(timeout=10)


@pytest.mark.vm
async def test_console_log_is_capped_and_rotated(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    console = manager.layout.console_log(capsule.id)
    rotated = console.with_suffix(".log.1")
    flood = f"head -c {CONSOLE_MAX + 300_000} /dev/zero | tr '\\0' x > /dev/ttyS0"
    result = await manager.exec(capsule.id, flood, timeout=300)
    assert result.exit_code == 0, result.stderr
    assert console.stat().st_size > CONSOLE_MAX
    # QEMU's own log (opened for appending by the runtime) grown past the cap the same way
    vmm_log = manager.layout.vmm_log(capsule.id)
    with vmm_log.open("ab") as f:
        f.write(b"qemu warning line\n" * (CONSOLE_MAX // 18 + 100))
    await Watchdog(manager).check()
    assert console.stat().st_size < CONSOLE_MAX
    assert 0 < rotated.stat().st_size <= CONSOLE_MAX
    assert vmm_log.stat().st_size < 10_000  # empty, but for what QEMU may write meanwhile
    assert 0 < vmm_log.with_suffix(".log.1").stat().st_size <= CONSOLE_MAX
    # QEMU goes on writing at the log's new end: no hole as large as what was rotated away.
    marker = "after-rotation-marker"
    result = await manager.exec(capsule.id, f"echo {marker} > /dev/ttyS0")
    assert result.exit_code == 0, result.stderr
    text = Path(console).read_bytes()
    assert marker.encode() in text
    assert len(text) < 100_000, len(text)


def _config(tmp_path: Path, metadata: str) -> VMConfig:  # a config no VM starts from
    return paper_config(tmp_path, capsule_id="cl-test", metadata_json=metadata)


def test_metadata_blob_is_private_fixed_size_and_bounded(tmp_path: Path) -> None:
    config = _config(tmp_path, json.dumps({"instanceID": "cl-test", "accessToken": "secret"}))
    write_metadata_blob(config)
    blob = metadata_blob(config)
    assert blob.stat().st_mode & 0o777 == 0o600
    data = blob.read_bytes()
    assert len(data) == wire.METADATA_FW_CFG_SIZE
    assert json.loads(data)["accessToken"] == "secret"
    # rewritten (a resume) to the same size, atomically
    write_metadata_blob(_config(tmp_path, json.dumps({"instanceID": "x" * 100})))
    assert len(blob.read_bytes()) == wire.METADATA_FW_CFG_SIZE
    assert not blob.with_suffix(".tmp").exists()
    with pytest.raises(VMMError, match="metadata document is"):
        write_metadata_blob(_config(tmp_path, json.dumps({"pad": "y" * 5000})))
    assert json.loads(blob.read_bytes())["instanceID"] == "x" * 100  # the old one is intact
    argv = build_argv(config)
    assert not any("guestfwd" in a or "cmd:" in a for a in argv), argv
    assert f"name={wire.METADATA_FW_CFG_NAME},file={blob}" in argv
    assert any("spawn=deny" in a for a in argv)


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        kids += [int(k) for k in text]
    return kids


@pytest.mark.vm
async def test_reading_metadata_starts_no_host_process(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    assert capsule.pid is not None
    # the old metadata address answers nothing now (each connection used to fork a process)
    storm = (
        'python3 -c "import socket\n'
        "ok = 0\n"
        "for _ in range(40):\n"
        "    try:\n"
        "        socket.create_connection(('10.0.2.100', 80), 0.5).close(); ok += 1\n"
        "    except OSError:\n"
        "        pass\n"
        'print(ok)"'
    )
    result = await manager.exec(capsule.id, storm, timeout=120)
    assert result.stdout.strip() == "0", result.stdout + result.stderr
    # envd's metadata is a file only root in the guest reads; reading it forks nothing
    reads = f"for i in $(seq 40); do cat {wire.METADATA_GUEST_PATH} > /dev/null; done; "
    reads += f"cat {wire.METADATA_GUEST_PATH}"
    result = await manager.exec(capsule.id, reads)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["instanceID"] == capsule.id
    assert _children(capsule.pid) == []
    as_user = await manager.exec(capsule.id, f"su user -c 'cat {wire.METADATA_GUEST_PATH}'")
    assert as_user.exit_code != 0 and "ermission denied" in as_user.stderr, as_user
    assert capsule.access_token not in as_user.stdout
