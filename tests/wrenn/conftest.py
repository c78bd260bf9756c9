"""The Wrenn SDK (``wrenn==0.3.0``, Python >= 3.13) in a venv of its own, made from PyPI by
the first test that needs it, and the agent API over a real CapsuleManager (with a sampler)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from backend.api.capsules import Capsules, ManagerCapsules
from backend.capsules.manager import CapsuleManager
from backend.config import Paths
from backend.sampler import ManagerSource, Sampler
from tests.e2b.conftest import ServerThread
from tests.integration.conftest import destroy_all
from tests.sdk_runner import run_scenario
from tests.wrenn.sdk_venv import NoPython313, ensure_sdk_venv

SCENARIO = Path(__file__).with_name("sdk_scenario.py")


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    try:
        return ensure_sdk_venv()
    except NoPython313 as exc:
        pytest.skip(str(exc))


def sdk_env(key: str, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WRENN_API")}
    env.pop("WRENN_BASE_URL", None)
    env.pop("WRENN_PROXY_DOMAIN", None)
    env.update(
        WRENN_API_KEY=key,
        WRENN_BASE_URL=url,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def run_sdk(
    python: Path, key: str, url: str, scenario: str, *args: str, timeout: float = 400
) -> dict[str, Any]:
    return run_scenario(python, SCENARIO, sdk_env(key, url), scenario, *args, timeout=timeout)


@pytest.fixture
def wrenn_api(paths: Paths) -> Iterator[ServerThread]:
    """The agent API over a real CapsuleManager and a running sampler, on its own loop."""

    async def make() -> Capsules:
        manager = CapsuleManager(paths)
        await manager.start(watchdog=True)
        sampler = Sampler(ManagerSource(manager), store=manager.store)
        await sampler.start()
        return ManagerCapsules(manager, sampler)

    async def close(capsules: Capsules) -> None:
        assert isinstance(capsules, ManagerCapsules)
        if capsules.sampler is not None:
            await capsules.sampler.stop()
        await capsules.manager.close()

    server = ServerThread(make, close).start()
    try:
        yield server
    finally:
        server.stop()
        asyncio.run(destroy_all(paths))


# the E2B tests' stand-in capsules (host envd processes), for what needs no VM
from tests.e2b.conftest import host_api  # noqa: E402, F401
