"""Issue 16 item 5: no host-to-envd client uses proxy settings from the environment (the token
would go to the proxy). A listener stands in for the proxy and must never be reached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.capsules.envd_client import EnvdClient
from backend.pty_client import PtyClient
from backend.sampler.envd_poll import EnvdPoller
from backend.sampler.models import Target
from tests.envd.conftest import Envd, start_envd

from .listeners import RecordingListener


@pytest.fixture
def proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[RecordingListener]:
    with RecordingListener() as listener:
        url = f"http://127.0.0.1:{listener.port}"
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "all_proxy"):
            monkeypatch.setenv(name, url)
        for name in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(name, raising=False)
        yield listener


@pytest.fixture
def envd(tmp_path: Path) -> Iterator[Envd]:
    instance = start_envd(tmp_path / "root")
    try:
        yield instance
    finally:
        instance.stop()


async def test_host_clients_ignore_proxy_settings(envd: Envd, proxy: RecordingListener) -> None:
    async with EnvdClient(envd.url, None, timeout=10) as client:
        await client.init(accessToken="tok")
    async with EnvdClient(envd.url, "tok", timeout=10) as client:
        assert (await client.metrics())["cpu_count"] >= 1
        assert (await client.exec("echo hi")).stdout == "hi\n"
    poller = EnvdPoller(timeout=5)
    try:
        metrics = await poller.fetch(Target("cl-x", envd.url, "tok", None))
        assert metrics["cpu_count"] >= 1
    finally:
        await poller.aclose()
    pty = PtyClient(envd.url, "tok", cols=80, rows=24)
    try:
        attached = await pty.start()
        assert attached.tag
    finally:
        await pty.close()
    assert proxy.connections == 0, proxy.requests
