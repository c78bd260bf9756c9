"""Issue 16 item 11: a guest cannot grow host resources without bound: the console log is
capped and rotated (a real VM writing its serial port), and every envd answer the host reads
whole is capped."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.capsules.envd_client import EnvdClient, EnvdError
from backend.capsules.manager import CapsuleManager
from backend.capsules.watchdog import Watchdog
from backend.envd import protocol as wire
from backend.runtime.logs import CONSOLE_MAX
from tests.integration.conftest import manager

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
    await Watchdog(manager).check()
    assert console.stat().st_size < CONSOLE_MAX
    assert 0 < rotated.stat().st_size <= CONSOLE_MAX
    # QEMU goes on writing at the log's new end: no hole as large as what was rotated away.
    marker = "after-rotation-marker"
    result = await manager.exec(capsule.id, f"echo {marker} > /dev/ttyS0")
    assert result.exit_code == 0, result.stderr
    text = Path(console).read_bytes()
    assert marker.encode() in text
    assert len(text) < 100_000, len(text)
