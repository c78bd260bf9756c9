"""Real envd processes on this host (host mode) for tests and benches: start them (many at once
if asked), wait until each answers /health, stop them. One place for what every suite and
bench needs, so a change in how envd starts is made once."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

REPO = Path(__file__).resolve().parents[1]
PORT_RETRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class HostEnvd:
    proc: subprocess.Popen[bytes]
    port: int
    root: Path
    log_path: Path | None
    """None when the output was thrown away (benches)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log kept)"
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 5.0) -> bool:
        """SIGTERM; False when envd had to be killed because it did not exit in time."""
        if self.proc.poll() is not None:
            return True
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)
            return False
        return True


E = TypeVar("E", bound=HostEnvd)


class PortTaken(Exception):
    """free_port() only finds a port free: something took it before envd could bind."""


def spawn(
    root: Path,
    *args: str,
    cls: type[E],
    module: str = "backend.envd",
    prefix: Sequence[str] = (),
    host_mode: bool = True,
    keep_log: bool = True,
    preexec_fn: Callable[[], None] | None = None,
    avoid: set[int] | frozenset[int] = frozenset(),
) -> E:
    """Start one envd on a free loopback port, serving `root` as / in host mode (without
    `host_mode` the paths are the host's, as in a capsule); its output goes to a log beside
    `root` unless `keep_log` is off; `avoid`: ports handed to envds not yet listening."""
    port = free_port()
    while port in avoid:
        port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    log_path = root.parent / f"envd-{port}.log" if keep_log else None
    argv = [*prefix, sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]
    if host_mode:
        argv += ["--root", str(root)]
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(log_path.open("wb")) if log_path is not None else None
        proc = subprocess.Popen(
            [*argv, *args],
            cwd=REPO,
            stdout=out if out is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT if out is not None else subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec_fn,
        )
    return cls(proc, port, root, log_path)


def wait_healthy(envds: Sequence[HostEnvd], timeout: float = 20.0, poll_s: float = 0.05) -> None:
    """Until every envd answers /health; raises PortTaken or RuntimeError (with the log) for
    the first that exits or stays silent. Many envds start in parallel, so they are polled
    together rather than one after the other."""
    pending = list(envds)
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as client:
        while pending:
            for envd in list(pending):
                if envd.proc.poll() is not None:
                    if "address already in use" in envd.log():
                        raise PortTaken(envd.port)
                    raise RuntimeError(
                        f"envd on port {envd.port} exited with {envd.proc.returncode}:\n"
                        f"{envd.log()[-3000:]}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{envd.url}/health").status_code == 200:
                        pending.remove(envd)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(pending)} envd(s) did not answer /health within {timeout:g} s; "
                    f"port {pending[0].port}:\n{pending[0].log()[-3000:]}"
                )
            time.sleep(poll_s)


def start(root: Path, *args: str, cls: type[E], timeout: float = 20.0, **options: Any) -> E:
    """spawn() and wait_healthy(), on another port when the first was taken meanwhile."""
    for _ in range(PORT_RETRIES):
        envd = spawn(root, *args, cls=cls, **options)
        try:
            wait_healthy([envd], timeout)
        except PortTaken:
            envd.stop()
            continue
        except BaseException:
            envd.stop()
            raise
        return envd
    raise RuntimeError(f"envd found no free port {PORT_RETRIES} times in a row")


def start_many(count: int, parent: Path, *args: str, timeout: float = 60.0) -> list[HostEnvd]:
    """`count` envds started at once (each imports for ~1 s), roots parent/envd-<i>; all are
    stopped again if any fails to come up. Ports are picked distinct, and one taken by
    something else before its envd bound it is replaced by a fresh envd on another."""
    started: list[HostEnvd] = []
    used: set[int] = set()

    def launch(index: int) -> HostEnvd:
        envd = spawn(parent / f"envd-{index}", *args, cls=HostEnvd, avoid=used)
        used.add(envd.port)
        return envd

    try:
        for index in range(count):
            started.append(launch(index))
        for _ in range(PORT_RETRIES * count):
            try:
                wait_healthy(started, timeout)
                return started
            except PortTaken as taken:
                index = next(i for i, e in enumerate(started) if e.port == taken.args[0])
                started[index].stop()
                started[index] = launch(index)
        raise RuntimeError("envds kept losing their ports to other processes")
    except BaseException:
        stop_all(started)
        raise


def stop_all(envds: Sequence[HostEnvd]) -> list[HostEnvd]:
    """SIGTERM every one first (they shut down in parallel), then wait; returns those that
    had to be killed."""
    for envd in envds:
        if envd.proc.poll() is None:
            envd.proc.terminate()
    return [envd for envd in envds if not envd.stop()]
