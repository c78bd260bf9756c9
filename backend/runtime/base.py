"""The runtime interface the capsule layer is written against: one VMM process per capsule.

Operations are named after what the VMM does (QMP's `stop`/`cont`, Firecracker's
`snapshot_create`, `balloon`), so that a reader who knows the VMM recognises every call.
QEMU (backend/runtime/qemu.py) is one implementation; a Firecracker driver would be another,
and the tests drive the capsule layer's failure paths through a fake one.
"""

from __future__ import annotations

from collections.abc import Awaitable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from backend.envd.protocol import ENVD_PORT


class VMMError(Exception):
    """A VMM operation failed; the message says which and why."""


class VMMCommandError(VMMError):
    """The VMM answered a command with an error (QMP's error class and description kept)."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command} failed: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class VMMGone(VMMError):
    """The VMM process exited, or its control socket cannot be reached."""


class MigrationFailed(VMMError):
    """Saving or loading device state failed or timed out."""


GUEST_BOOT = "z2"
"""Changes whenever the guest kernel's command line does (a snapshot keeps the kernel state it
booted with): part of the warm snapshot's key, so an older one is never restored (z1: the
guest zeroes the pages it frees; z2: and under TCG it has no address-space randomisation)."""


@dataclass(frozen=True)
class VMConfig:
    """Everything needed to start (or restore) one capsule's VM. Restore needs the same."""

    capsule_id: str
    run_dir: Path
    kernel: Path
    initrd: Path
    disk: Path
    """The capsule's own qcow2 overlay."""
    ram_file: Path
    """Guest RAM lives in this file (in the agent's private shm dir) so that a snapshot can
    copy it without migrating it."""
    memory_mib: int
    vcpus: int
    host_port: int
    """Port forwarded to envd inside the guest (on `forward_host`)."""
    metadata_json: str
    """Given to the guest as its metadata document (see backend/runtime/qemu.py)."""
    accel: str = "tcg"
    guest_port: int = ENVD_PORT
    network: str = "none"
    """"none": the guest reaches nothing; the host reaches envd through its port forward;
    "internet": outbound NAT, never to the host's own addresses (backend/runtime/network.py)."""
    netns: str | None = None
    """Network namespace the VMM runs in (internet mode)."""
    forward_host: str = "127.0.0.1"
    """Address envd's port forward listens on (the namespace's veth address with a netns)."""
    extra_append: tuple[str, ...] = field(default_factory=tuple)
    agent_disk: Path | None = None
    """The image's read-only agent disk (envd, its Python, PID 1), attached after the capsule's
    disk; None for an image built before agent disks (its snapshots have no such device)."""
    free_page_hint: bool = False
    """Balloon with free-page hinting (an iothread): during a live migration the guest reports
    free pages and QEMU leaves them out of the stream (issue 21 spike; changes the device, so
    a snapshot restores only into a VM with the same setting)."""
    ram_private_base: str | None = None
    """When set, guest RAM is a private (copy-on-write) mapping of this file instead of the
    shared `ram_file`: a sealed template memfd (backend/capsules/ramdiff.py, issue 21 spike)."""

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def vmm_log(self) -> Path:
        return self.run_dir / "qemu.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "qemu.pid"


@dataclass(frozen=True)
class BalloonStats:
    """Balloon statistics as the guest reports them (bytes); None where not reported."""

    actual: int | None
    free: int | None
    total: int | None
    available: int | None
    disk_caches: int | None
    last_update: int | None


class VM(Protocol):
    """One running VMM process.

    The control connection is opened per operation (the dashboard and a CLI process may both
    drive one capsule); `session()` holds one connection over a sequence of commands, and any
    command outside a session opens its own.
    """

    @property
    def config(self) -> VMConfig: ...

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    def session(self) -> AbstractAsyncContextManager[VM]: ...

    async def is_running(self) -> bool:
        """True when the vCPUs run (False: stopped, e.g. left so by an interrupted save)."""
        ...

    async def stop(self) -> None:
        """Pause the vCPUs (QMP `stop`); returns once they are stopped and disks flushed."""
        ...

    async def cont(self) -> None:
        """Resume the vCPUs (QMP `cont`), also after a completed save."""
        ...

    async def snapshot_create(self, device_state: Path) -> None:
        """Save the device state of a stopped VM (RAM stays in the RAM file)."""
        ...

    async def save_to_fd(self, fd: int, what: str) -> None:
        """Migrate a stopped VM into the open descriptor `fd` (the caller keeps and closes its
        copy): device state, plus every RAM block that is not a shared file."""
        ...

    async def balloon_stats(self) -> BalloonStats: ...

    async def balloon_actual(self) -> int:
        """The guest's memory size now (RAM minus the balloon), bytes."""
        ...

    async def balloon_set(self, target_bytes: int) -> None:
        """Inflate or deflate the balloon towards a guest memory size."""
        ...

    async def quit(self) -> None:
        """Ask the VMM to exit, kill it if it does not."""
        ...

    def kill(self) -> None: ...

    async def wait_exit(self, timeout: float) -> bool:
        """Wait for the process to end; False if it is still there after `timeout`."""
        ...


class Runtime(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def accel(self) -> str: ...

    async def create(self, config: VMConfig) -> VM:
        """Boot a new VM."""
        ...

    async def restore(
        self, config: VMConfig, device_state: Path, ready: Awaitable[None] | None = None
    ) -> VM:
        """Start a VM from the RAM file and a saved device state, and run it. `ready` (the
        RAM file still being filled) runs meanwhile; the state is loaded after it succeeds."""
        ...

    def attach(self, config: VMConfig, pid: int | None) -> VM | None:
        """The VM an earlier agent (or another process) started for `config`, or None when
        `pid` is not that VM any more (exited, or the pid was reused)."""
        ...
