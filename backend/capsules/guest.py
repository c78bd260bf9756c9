"""What the capsule layer says to a guest: its metadata document, the /init that gives a
(re)started VM its identity, and the envd operations it needs (an interface, so that tests
can drive failure paths with a fake envd; backend/capsules/envd_client.py is the real one)."""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol, Self

from backend.capsules.envd_client import EnvdClient, ExecResult
from backend.capsules.models import Capsule

BOOT_DEADLINE_S = 180.0
"""How long a booted (not restored) guest's envd may take to answer."""
RESUME_DEADLINE_S = 60.0
"""How long a restored guest's envd may take to answer."""


class Envd(Protocol):
    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def wait_healthy(
        self, deadline_s: float, is_alive: Callable[[], bool] | None
    ) -> float: ...

    async def init(self, **body: Any) -> dict[str, Any]: ...

    async def snapshot_prepare(self) -> dict[str, Any]: ...

    async def snapshot_abort(self) -> None: ...

    async def metrics(self, timeout: float = 1.0) -> dict[str, Any]: ...

    async def exec(
        self,
        cmd: str,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ExecResult: ...


EnvdFactory = Callable[[str, "str | None", float], Envd]
"""(envd URL, access token, timeout) -> a client."""


def real_envd(url: str, token: str | None, timeout: float) -> Envd:
    return EnvdClient(url, token, timeout=timeout)


def metadata_json(capsule: Capsule) -> str:
    """The document the guest reads at the metadata address (fixed per VMM process). It
    carries the capsule's token: a freshly booted envd takes it before answering anything
    (envd is never open without a token under the agent); a restored one keeps the token it
    holds until the host's /init replaces it."""
    return json.dumps(
        {
            "accessToken": capsule.access_token,
            "instanceID": capsule.id,
            "templateID": capsule.template,
            "envID": capsule.template,
            "network": capsule.network,
        }
    )


def init_body(capsule: Capsule) -> dict[str, Any]:
    """/init after a boot or a restore: the capsule's token, identity, the host's clock, and
    fresh entropy (a restored guest's RNG state is a copy of every other clone's)."""
    return {
        "accessToken": capsule.access_token,
        "timestamp": time.time(),
        "instanceID": capsule.id,
        "templateID": capsule.template,
        "entropy": base64.b64encode(os.urandom(64)).decode(),
    }
