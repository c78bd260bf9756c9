"""What /init and the metadata source tell envd, and the snapshot hold flag."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .errors import bad_request
from .validation import Fields, check_env


@dataclass(frozen=True)
class InitRequest:
    access_token: str | None = None
    env_vars: dict[str, str] | None = None
    default_user: str | None = None
    default_workdir: str | None = None
    timestamp: float | None = None
    instance_id: str | None = None
    template_id: str | None = None
    entropy: bytes | None = None
    reclaim_threshold: float | None = None

    @classmethod
    def parse(cls, body: object) -> InitRequest:
        f = Fields(body)
        env = f.opt_str_map("envVars")
        threshold = f.opt_number("reclaimThreshold")
        if threshold is not None and not 0 < threshold <= 100:
            raise bad_request("reclaimThreshold is a percentage in (0, 100]", "invalid_field")
        timestamp = f.opt_number("timestamp")
        if timestamp is not None and timestamp <= 0:
            raise bad_request("timestamp must be positive Unix seconds", "invalid_field")
        token = f.opt_str("accessToken")
        if token is not None and not token:
            # A token is only ever replaced by another: envd is never open to everyone.
            raise bad_request("accessToken must not be empty", "invalid_field")
        workdir = f.opt_str("defaultWorkdir") or None
        if workdir is not None and not workdir.startswith("/"):
            raise bad_request("defaultWorkdir must be an absolute path", "invalid_field")
        return cls(
            access_token=token,
            env_vars=check_env(env) if env is not None else None,
            default_user=f.opt_str("defaultUser") or None,
            default_workdir=workdir,
            timestamp=timestamp,
            instance_id=f.opt_str("instanceID") or None,
            template_id=f.opt_str("templateID") or f.opt_str("envID") or None,
            entropy=f.opt_b64("entropy"),
            reclaim_threshold=threshold,
        )


@dataclass
class RuntimeState:
    reclaim_threshold: float = 80.0
    snapshot_hold_timeout: float = 600.0
    access_token: str | None = None
    token_required: bool = False
    """Under the agent: until a token is known (metadata or /init), nothing but /health."""
    env_vars: dict[str, str] = field(default_factory=dict)
    default_user: str | None = None
    default_workdir: str | None = None
    sandbox_id: str | None = None
    template_id: str | None = None
    init_count: int = 0
    last_init_at: float | None = None
    _snapshot_since: float | None = None
    _token_changed: asyncio.Event | None = None

    def token_changed(self) -> asyncio.Event:
        """Set when the token in force now is replaced (streams opened under it end then)."""
        if self._token_changed is None:
            self._token_changed = asyncio.Event()
        return self._token_changed

    def set_token(self, token: str) -> None:
        if token == self.access_token:
            return
        self.access_token = token
        old, self._token_changed = self._token_changed, None
        if old is not None:
            old.set()

    @property
    def snapshot_in_progress(self) -> bool:
        since = self._snapshot_since
        if since is not None and time.monotonic() - since > self.snapshot_hold_timeout:
            self._snapshot_since = None
        return self._snapshot_since is not None

    def begin_snapshot(self) -> None:
        self._snapshot_since = time.monotonic()

    def end_snapshot(self) -> None:
        self._snapshot_since = None

    def sandbox_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.sandbox_id:
            env["WRENN_SANDBOX_ID"] = env["E2B_SANDBOX_ID"] = self.sandbox_id
        if self.template_id:
            env["WRENN_TEMPLATE_ID"] = env["E2B_TEMPLATE_ID"] = self.template_id
        env.update(self.env_vars)
        return env
