"""The capsule record and its states, as stored and as the dashboard and CLI see them."""

from __future__ import annotations

import enum
import secrets
import string
from dataclasses import dataclass, field, replace
from typing import Any

ID_ALPHABET = string.digits + string.ascii_lowercase


class State(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    RESUMING = "resuming"
    STOPPED = "stopped"
    ERROR = "error"


def new_capsule_id() -> str:
    """`cl-` and 12 random base36 characters (62 bits)."""
    return "cl-" + "".join(secrets.choice(ID_ALPHABET) for _ in range(12))


@dataclass(frozen=True)
class Capsule:
    id: str
    state: State
    template: str
    image_dir: str
    """The exact image version (resolved path) the capsule's disk and RAM were made from."""
    memory_mib: int
    vcpus: int
    created_at: float
    host_port: int
    access_token: str
    network: str = "none"
    reason: str = ""
    """Why the capsule is in `error` (or why the last operation failed)."""
    pid: int | None = None
    started_at: float | None = None
    generation: int = 0
    """The snapshot generation the capsule last paused to (0: never paused)."""
    auto_pause_s: int = 0
    last_activity: float = 0.0
    accel: str = "tcg"
    envd_host: str = "127.0.0.1"
    """Where envd's forward listens: loopback, or the capsule namespace's veth address."""
    net_slot: int | None = None
    """The internet mode's address slot (backend/runtime/network.py)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> Capsule:
        return replace(self, **changes)

    @property
    def envd_url(self) -> str:
        return f"http://{self.envd_host}:{self.host_port}"


@dataclass(frozen=True)
class Snapshot:
    capsule_id: str
    generation: int
    path: str
    created_at: float
    ram_size: int
    ram_allocated: int
    ram_sha256: str
    disk_allocated: int
    disk_sha256: str
    state_size: int
    state_sha256: str
    pause_seconds: float

    @property
    def total_allocated(self) -> int:
        return self.ram_allocated + self.disk_allocated + self.state_size


@dataclass(frozen=True)
class Event:
    capsule_id: str
    ts: float
    kind: str
    message: str
