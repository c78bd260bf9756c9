"""Start-up configuration, fixed for the life of the process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .protocol import ENVD_PORT

DEFAULT_PORT = ENVD_PORT
KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    # Set = host mode: DIR stands in for "/" and privileged kernel writes are only simulated.
    root: Path | None = None
    metadata: str | None = None
    metadata_interval: float = 5.0
    reclaim_interval: float = 2.0
    reclaim_threshold: float = 80.0
    cpu_interval: float = 1.0
    ping_interval: float = 30.0
    # Safety net should the host lose track of a paused capsule and never call /init or abort.
    snapshot_hold_timeout: float = 600.0
    proc_path: Path = Path("/proc")
    pty_buffer_bytes: int = 256 * KIB
    process_buffer_bytes: int = 1 * MIB
    exec_output_limit: int = 16 * MIB

    @property
    def host_mode(self) -> bool:
        return self.root is not None

    @property
    def fs_root(self) -> Path:
        return self.root if self.root is not None else Path("/")

    @property
    def run_dir(self) -> Path:
        return self.fs_root / "run" / "wrenn"
