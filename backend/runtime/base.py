"""The runtime interface the capsule manager drives.

The operations are named after what the VMM does (QMP `stop`/`cont`, Firecracker's
`snapshot_create`), so that a Firecracker runtime can be added beside QEMU later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from backend.envd.protocol import ENVD_PORT


class VMMError(Exception):
    """A VMM operation failed; the message says which and why."""


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
    """Guest RAM lives in this file (under /dev/shm) so it can be saved without migration."""
    memory_mib: int
    vcpus: int
    host_port: int
    """127.0.0.1 port forwarded to envd inside the guest."""
    metadata_json: str
    """Served to the guest at the metadata address (see backend/runtime/qemu.py)."""
    accel: str = "tcg"
    guest_port: int = ENVD_PORT
    network: str = "none"
    """"none": the guest reaches nothing but its port forward and the metadata address;
    "internet": outbound NAT, never to the host's own addresses (backend/runtime/network.py)."""
    netns: str | None = None
    """Network namespace QEMU runs in (internet mode)."""
    forward_host: str = "127.0.0.1"
    """Address envd's port forward listens on (the namespace's veth address with a netns)."""
    extra_append: tuple[str, ...] = field(default_factory=tuple)

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
    """One running VMM process."""

    config: VMConfig

    @property
    def pid(self) -> int: ...

    def alive(self) -> bool: ...

    async def stop(self) -> None:
        """Pause the vCPUs (QMP `stop`)."""

    async def cont(self) -> None:
        """Resume the vCPUs (QMP `cont`)."""

    async def snapshot_create(self, device_state: Path) -> None:
        """Save the device state (RAM stays in the RAM file) of a stopped VM."""

    async def balloon_stats(self) -> BalloonStats: ...

    async def balloon_actual(self) -> int:
        """The guest's memory size now (RAM minus the balloon), bytes."""

    async def balloon_set(self, target_bytes: int) -> None:
        """Inflate or deflate the balloon towards a guest memory size."""

    async def quit(self) -> None:
        """Ask the VMM to exit, kill it if it does not."""


class Runtime(Protocol):
    name: str

    async def create(self, config: VMConfig) -> VM:
        """Boot a new VM."""

    async def restore(self, config: VMConfig, device_state: Path) -> VM:
        """Start a VM from a RAM file already in place and a saved device state; running."""

    async def adopt(self, config: VMConfig, pid: int) -> VM:
        """Reattach to a VM started by an earlier agent; raises if it is not that VM."""
