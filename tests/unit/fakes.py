"""A fake runtime and a fake envd for the capsule layer's failure paths: they implement the
`Runtime`/`VM` (backend/runtime/base.py) and `Envd` (backend/capsules/guest.py) interfaces
in memory, and fail on cue. The real-VM tests (tests/integration) cover the happy paths with
QEMU; these make a failed migration, a dead VMM or a refused /init take milliseconds."""

from __future__ import annotations

import contextlib
import inspect
import itertools
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Self

from backend.capsules.envd_client import EnvdError, ExecResult
from backend.runtime.base import VM, BalloonStats, VMConfig, VMMGone

# pids far above pid_max: never a real process
_pids = itertools.count(10_000_000)


class Faults:
    """What should fail next: `faults.arm("snapshot_create", exc)` makes the next call raise."""

    def __init__(self) -> None:
        self._armed: dict[str, BaseException] = {}
        self.calls: list[str] = []

    def arm(self, what: str, exc: BaseException) -> None:
        self._armed[what] = exc

    def hit(self, what: str) -> None:
        self.calls.append(what)
        exc = self._armed.pop(what, None)
        if exc is not None:
            raise exc


class FakeVM:
    def __init__(self, runtime: FakeRuntime, config: VMConfig) -> None:
        self._config = config
        self._pid = next(_pids)
        self._runtime = runtime
        self.running = True
        self.exited = False
        self.balloon = config.memory_mib << 20

    @property
    def config(self) -> VMConfig:
        return self._config

    @property
    def pid(self) -> int:
        return self._pid

    def alive(self) -> bool:
        return not self.exited

    def _check(self, what: str) -> None:
        if self.exited:
            raise VMMGone(f"QEMU (pid {self.pid}) is gone")
        self._runtime.faults.hit(what)

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[VM]:
        yield self

    def session(self) -> contextlib.AbstractAsyncContextManager[VM]:
        return self._session()

    async def is_running(self) -> bool:
        self._check("is_running")
        return self.running

    async def stop(self) -> None:
        self._check("stop")
        self.running = False

    async def cont(self) -> None:
        self._check("cont")
        self.running = True

    async def snapshot_create(self, device_state: Path) -> None:
        self._check("snapshot_create")
        device_state.write_bytes(b"fake device state " + self.config.capsule_id.encode())

    async def save_to_fd(self, fd: int, what: str) -> None:
        self._check("save_to_fd")
        os.write(fd, b"fake device state " + self.config.capsule_id.encode())

    async def balloon_stats(self) -> BalloonStats:
        self._check("balloon_stats")
        return BalloonStats(self.balloon, None, None, None, None, None)

    async def balloon_actual(self) -> int:
        self._check("balloon_actual")
        return self.balloon

    async def balloon_set(self, target_bytes: int) -> None:
        self._check("balloon_set")
        self.balloon = target_bytes

    async def quit(self) -> None:
        self._check("quit")
        self.exited = True

    def kill(self) -> None:
        self.exited = True

    async def wait_exit(self, timeout: float) -> bool:
        return self.exited


class FakeRuntime:
    """Keeps every VM it made by pid, so `attach` finds them as a restarted agent would."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.vms: dict[int, FakeVM] = {}

    @property
    def name(self) -> str:
        return "fake"

    @property
    def accel(self) -> str:
        return "tcg"

    def _new(self, config: VMConfig) -> FakeVM:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        vm = FakeVM(self, config)
        self.vms[vm.pid] = vm
        return vm

    async def create(self, config: VMConfig) -> VM:
        self.faults.hit("create")
        return self._new(config)

    async def restore(
        self, config: VMConfig, device_state: Path, ready: Awaitable[None] | None = None
    ) -> VM:
        try:
            self.faults.hit("restore")
        except BaseException:
            if inspect.iscoroutine(ready):
                ready.close()  # never awaited: say so to Python, not as a warning
            raise
        vm = self._new(config)
        if ready is not None:
            await ready
        return vm

    def attach(self, config: VMConfig, pid: int | None) -> VM | None:
        vm = self.vms.get(pid) if pid is not None else None
        return vm if vm is not None and vm.alive() else None

    def live(self) -> list[FakeVM]:
        return [vm for vm in self.vms.values() if vm.alive()]


class FakeGuest:
    """What envd holds inside one fake capsule (shared by every client of its URL)."""

    def __init__(self) -> None:
        self.token: str | None = None
        self.holding = False
        self.inits: list[dict[str, Any]] = []


class FakeEnvds:
    """An `EnvdFactory`: one FakeGuest per envd URL; the token is checked like envd does."""

    def __init__(self) -> None:
        self.faults = Faults()
        self.guests: dict[str, FakeGuest] = {}

    def __call__(self, url: str, token: str | None, timeout: float) -> FakeEnvd:
        return FakeEnvd(self, self.guests.setdefault(url, FakeGuest()), token)


class FakeEnvd:
    def __init__(self, envds: FakeEnvds, guest: FakeGuest, token: str | None) -> None:
        self._envds = envds
        self._guest = guest
        self._token = token

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    def _check(self, what: str) -> None:
        self._envds.faults.hit(what)
        if self._guest.token is not None and self._token != self._guest.token:
            raise EnvdError(f"{what}: 401 unauthorized")

    async def wait_healthy(self, deadline_s: float, is_alive: Callable[[], bool] | None) -> float:
        self._envds.faults.hit("health")
        if is_alive is not None and not is_alive():
            raise EnvdError("the VM exited before envd answered")
        return 0.001

    async def init(self, **body: Any) -> dict[str, Any]:
        self._check("init")
        self._guest.token = body["accessToken"]
        self._guest.inits.append(body)
        return {}

    async def snapshot_prepare(self) -> dict[str, Any]:
        self._check("snapshot_prepare")
        self._guest.holding = True
        return {"after": {"mem_available": 200 << 20}}

    async def snapshot_abort(self) -> None:
        self._check("snapshot_abort")
        self._guest.holding = False

    async def metrics(self, timeout: float = 1.0) -> dict[str, Any]:
        self._check("metrics")
        return {}

    async def exec(
        self,
        cmd: str,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        self._check("exec")
        return ExecResult(exit_code=0, stdout="", stderr="")
