"""The Wrenn SDK (``wrenn==0.3.0``, Python >= 3.13) in a venv of its own, made from PyPI by
the first test that needs it, and the agent API over a real CapsuleManager (with a sampler)."""

from __future__ import annotations

import asyncio
import fcntl
import glob
import json
import os
import shutil
import subprocess
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

SDK_VERSION = "0.3.0"
SDK_VENV = Path(f"/tmp/wrenn-sdk-venv-{SDK_VERSION}")
SCENARIO = Path(__file__).with_name("sdk_scenario.py")
READY_MARK = ".wrenn-ready"
MIN_PYTHON = (3, 13)


def find_python() -> str | None:
    """A Python >= 3.13: on PATH, or under pyenv (``$PYENV_ROOT`` or ``~/.pyenv``)."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(13, 20)]
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{root}/versions/3.1[3-9]*/bin/python3"), reverse=True)
    candidates.append(shutil.which("python3"))
    for candidate in candidates:
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 13))"],
            capture_output=True,
            text=True,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


def ensure_sdk_venv(venv: Path = SDK_VENV) -> Path:
    """``wrenn==SDK_VERSION`` in its own venv, made once and reused (a half-made one, without
    the ready mark, is made again)."""
    python = venv / "bin" / "python"
    base = find_python()
    if base is None:
        pytest.skip(
            "the Wrenn SDK needs Python >= 3.13 and none was found: install one "
            "(`pyenv install 3.13` or apt-get install python3.13) and re-run"
        )
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY_MARK).is_file() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             f"wrenn=={SDK_VERSION}"],
            check=True,
        )  # fmt: skip
        (venv / READY_MARK).write_text(SDK_VERSION + "\n")
    return python


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    return ensure_sdk_venv()


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
    result = subprocess.run(
        [str(python), str(SCENARIO), scenario, *args],
        env=sdk_env(key, url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, (
        f"SDK scenario {scenario} failed:\n{result.stdout}\n{result.stderr}"
    )
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return out


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
