"""Wrenn's wire models (the SDK's ``wrenn/models/_generated.py``) from our records."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from backend.capsules.models import Capsule, State
from backend.capsules.templates import Template
from backend.envd import __version__ as ENVD_VERSION

from .errors import invalid

WRENN = "wrenn"
"""The key of what a Wrenn client said at create time in the capsule's ``extra``."""

STATUS = {
    State.PENDING: "starting",
    State.RUNNING: "running",
    State.PAUSING: "pausing",
    State.PAUSED: "paused",
    State.RESUMING: "resuming",
    State.STOPPED: "stopped",
    State.ERROR: "error",
}

TEMPLATE_ALIASES = {"minimal-ubuntu": "default", "minimal": "default", "base": "default"}
"""Wrenn's default template names, and ours."""

METADATA_KEY = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9._-]{0,63}")
RESERVED_METADATA = frozenset({"kernel_version", "vmm_version", "agent_version", "envd_version"})
MAX_METADATA_KEYS = 20
MAX_METADATA_VALUE = 64


def iso(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def wrenn_info(capsule: Capsule) -> dict[str, Any]:
    info = capsule.extra.get(WRENN)
    return dict(info) if isinstance(info, dict) else {}


def capsule_body(
    capsule: Capsule, *, disk_size_mb: int | None = None, disk_used_mb: int | None = None
) -> dict[str, Any]:
    metadata: dict[str, str] = dict(wrenn_info(capsule).get("metadata") or {})
    if capsule.state == State.RUNNING:
        metadata.update(envd_version=ENVD_VERSION, vmm_version=f"qemu ({capsule.accel})")
    body: dict[str, Any] = {
        "id": capsule.id,
        "status": STATUS.get(capsule.state, "error"),
        "template": capsule.template,
        "vcpus": capsule.vcpus,
        "memory_mb": capsule.memory_mib,
        "timeout_sec": capsule.auto_pause_s,
        "created_at": iso(capsule.created_at),
        "started_at": iso(capsule.started_at),
        "last_active_at": iso(capsule.last_activity),
        "metadata": metadata,
    }
    if disk_size_mb is not None:
        body["disk_size_mb"] = disk_size_mb
    if disk_used_mb is not None:
        body["disk_used_mb"] = disk_used_mb
    return body


def template_body(template: Template) -> dict[str, Any]:
    return {
        "name": template.name,
        "type": "base" if template.builtin else "snapshot",
        "vcpus": template.vcpus or None,
        "memory_mb": template.memory_mib or None,
        "size_bytes": template.allocated,
        "created_at": iso(template.created_at),
        "platform": template.builtin,
        "protected": template.builtin,
        "metadata": {"source": template.source, "network": template.network}
        if not template.builtin
        else {"source": template.source},
    }


def metadata_field(body: dict[str, Any]) -> dict[str, str]:
    value = body.get("metadata")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("metadata must be an object of strings")
    if len(value) > MAX_METADATA_KEYS:
        raise invalid(f"metadata has {len(value)} keys; at most {MAX_METADATA_KEYS}")
    for key, item in value.items():
        if not METADATA_KEY.fullmatch(key):
            raise invalid(f"metadata key {key!r} must match {METADATA_KEY.pattern}")
        if key in RESERVED_METADATA:
            raise invalid(f"metadata key {key!r} is reserved for the system")
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE:
            raise invalid(f"metadata value of {key!r} must be a string of at most 64 characters")
    return dict(value)
