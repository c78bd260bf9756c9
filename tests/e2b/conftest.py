"""The E2B SDK in its own venv, envd with the Connect façade on the host, and the agent API
server in a thread (over real capsules, or over host envd processes standing in for them)."""

from __future__ import annotations

import asyncio
import builtins
import fcntl
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest

from backend.api.capsules import Capsules
from backend.api.server import ApiServer
from backend.capsules.errors import CapsuleError, CapsuleNotFound, IllegalTransition
from backend.capsules.models import Capsule, State, new_capsule_id
from backend.capsules.templates import Template, TemplateNotFound
from tests import hostenvd
from tests.hostenvd import HostEnvd
from tests.sdk_runner import run_scenario

REPO = Path(__file__).resolve().parents[2]
SDK_VERSION = "2.63.0"
SDK_VENV = Path(f"/tmp/wrenn-e2b-venv-{SDK_VERSION}")
SCENARIO = Path(__file__).with_name("sdk_scenario.py")
READY_MARK = ".wrenn-ready"


# -- the SDK's venv ------------------------------------------------------------------------------


def ensure_sdk_venv(venv: Path = SDK_VENV) -> Path:
    """``e2b==SDK_VERSION`` in a venv of its own (it pins connectrpc<0.13 and protobuf-py<0.7),
    made once and reused; a half-made one (no ready mark) is made again."""
    python = venv / "bin" / "python"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY_MARK).is_file() and python.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                f"e2b=={SDK_VERSION}",
            ],
            check=True,
        )
        (venv / READY_MARK).write_text(SDK_VERSION + "\n")
    return python


@pytest.fixture(scope="session")
def sdk_python() -> Path:
    return ensure_sdk_venv()


def sdk_env(key: str, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(
        E2B_API_KEY=key,
        E2B_API_URL=url,
        E2B_SANDBOX_URL=url,
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
    )
    return env


def run_sdk(
    python: Path, key: str, url: str, scenario: str, *args: str, timeout: float = 120
) -> dict[str, Any]:
    return run_scenario(python, SCENARIO, sdk_env(key, url), scenario, *args, timeout=timeout)


# -- envd on the host ---------------------------------------------------------------------------


def start_host_envd(root: Path, *args: str) -> HostEnvd:
    """envd (host mode) with the Connect façade, as tests/e2b/envd_entry.py mounts it."""
    return hostenvd.start(root, *args, cls=HostEnvd, module="tests.e2b.envd_entry")


@pytest.fixture
def host_envd(tmp_path: Path) -> Iterator[HostEnvd]:
    envd = start_host_envd(tmp_path / "root")
    try:
        yield envd
    finally:
        envd.stop()
        assert "Traceback" not in envd.log(), envd.log()


# -- capsules played by host envd processes ------------------------------------------------------


@dataclass
class HostCapsules:
    """The Capsules protocol over host envd processes: create starts one, pause stops it
    (its files stay), resume starts it again. Everything but the VM, in well under a second."""

    base: Path
    capsules: dict[str, Capsule] = field(default_factory=dict)
    envds: dict[str, HostEnvd] = field(default_factory=dict)
    events: list[tuple[str, str, str]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)

    def get(self, capsule_id: str) -> Capsule:
        capsule = self.capsules.get(capsule_id)
        if capsule is None:
            raise CapsuleNotFound(f"no capsule {capsule_id!r}")
        return capsule

    def list(self) -> list[Capsule]:
        return list(self.capsules.values())

    def has_template(self, name: str) -> bool:
        return name == "default"

    async def _boot(self, capsule_id: str, token: str) -> HostEnvd:
        # the image's E2B user has a home (the API makes it the default workdir)
        (self.base / capsule_id / "root" / "home" / "user").mkdir(parents=True, exist_ok=True)
        envd = await asyncio.to_thread(start_host_envd, self.base / capsule_id / "root")
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{envd.url}/init", json={"accessToken": token, "instanceID": capsule_id}
            )
            response.raise_for_status()
        self.envds[capsule_id] = envd
        return envd

    async def create(self, *, template: str, network: str | None) -> Capsule:
        capsule_id = new_capsule_id()
        token = secrets.token_urlsafe(16)
        envd = await self._boot(capsule_id, token)
        now = time.time()
        capsule = Capsule(
            id=capsule_id,
            state=State.RUNNING,
            template=template,
            image_dir=str(self.base),
            memory_mib=256,
            vcpus=1,
            created_at=now,
            host_port=envd.port,
            access_token=token,
            network=network or "none",
            started_at=now,
        )
        self.capsules[capsule_id] = capsule
        return capsule

    async def pause(self, capsule_id: str) -> None:
        capsule = self.get(capsule_id)
        if capsule.state != State.RUNNING:
            raise IllegalTransition(f"cannot pause {capsule_id}: it is {capsule.state}")
        await asyncio.to_thread(self.envds.pop(capsule_id).stop)
        self.capsules[capsule_id] = capsule.with_(state=State.PAUSED)

    async def resume(self, capsule_id: str) -> Capsule:
        capsule = self.get(capsule_id)
        if capsule.state != State.PAUSED:
            raise IllegalTransition(f"cannot resume {capsule_id}: it is {capsule.state}")
        envd = await self._boot(capsule_id, capsule.access_token)
        resumed = capsule.with_(state=State.RUNNING, host_port=envd.port, started_at=time.time())
        self.capsules[capsule_id] = resumed
        return resumed

    async def resume_from_disk(self, capsule_id: str) -> Capsule:
        # a host envd keeps nothing in memory across a stop anyway
        return await self.resume(capsule_id)

    async def destroy(self, capsule_id: str) -> None:
        self.get(capsule_id)
        envd = self.envds.pop(capsule_id, None)
        if envd is not None:
            await asyncio.to_thread(envd.stop)
        del self.capsules[capsule_id]

    async def update_extra(self, capsule_id: str, key: str, value: dict[str, Any]) -> Capsule:
        capsule = self.get(capsule_id)
        updated = capsule.with_(extra={**capsule.extra, key: value})
        self.capsules[capsule_id] = updated
        return updated

    def touch(self, capsule_id: str) -> None:
        self.touched.add(capsule_id)

    def note(self, capsule_id: str, kind: str, message: str) -> None:
        self.events.append((capsule_id, kind, message))

    def snapshots(self) -> builtins.list[Template]:
        return []

    async def snapshot(self, capsule_id: str, name: str) -> Template:
        raise CapsuleError("host capsules have no snapshots (tests/e2b/test_vm.py has them)")

    async def delete_snapshot(self, name: str) -> None:
        raise TemplateNotFound(f"no template {name!r}")

    async def fork(self, capsule_id: str, count: int) -> builtins.list[Capsule]:
        raise CapsuleError("host capsules cannot be forked (tests/e2b/test_vm.py forks)")

    async def init_guest(self, capsule: Capsule, fields: dict[str, Any]) -> None:
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{capsule.envd_url}/init",
                json=fields,
                headers={"X-Access-Token": capsule.access_token},
            )
            response.raise_for_status()

    async def metrics(self, capsule: Capsule) -> dict[str, Any] | None:
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{capsule.envd_url}/metrics", headers={"X-Access-Token": capsule.access_token}
            )
            body: dict[str, Any] = response.json()
            return body

    def stop_all(self) -> None:
        for envd in self.envds.values():
            envd.stop()
        self.envds.clear()


# -- the API server in a thread of its own --------------------------------------------------------


class ServerThread:
    """ApiServer on its own event loop, so tests (and SDK subprocesses) talk to it over
    loopback exactly like an agent would."""

    def __init__(
        self,
        make_capsules: Callable[[], Awaitable[Capsules]],
        close_capsules: Callable[[Capsules], Awaitable[None]] | None = None,
    ) -> None:
        self.key = "wrenn_" + secrets.token_hex(8)
        self._make = make_capsules
        self._close = close_capsules
        self._ready: Future[None] = Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.capsules: Capsules | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._run, name="api-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.capsules = await self._make()
        server = ApiServer(self.capsules, self.key, port=0)
        await server.start()
        self.port = server.port
        self._ready.set_result(None)
        try:
            await self._stop.wait()
        finally:
            await server.stop()
            if self._close is not None:
                await self._close(self.capsules)

    def start(self) -> ServerThread:
        self._thread.start()
        self._ready.result(timeout=60)
        return self

    def call(self, coro: Awaitable[Any], timeout: float = 120) -> Any:
        """Run a coroutine on the server's loop (where the capsules' objects live)."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self._loop)
        return future.result(timeout)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"X-API-KEY": self.key}, timeout=60)


async def _as_coroutine(awaitable: Awaitable[Any]) -> Any:
    return await awaitable


@pytest.fixture
def host_api(tmp_path: Path) -> Iterator[ServerThread]:
    fake = HostCapsules(tmp_path / "capsules")

    async def make() -> Capsules:
        # a partial port: what the host-envd tests reach (templates, metrics and history
        # need VMs and are tested in tests/e2b/test_vm.py)
        return cast(Capsules, fake)

    server = ServerThread(make).start()
    try:
        yield server
    finally:
        server.stop()
        fake.stop_all()
