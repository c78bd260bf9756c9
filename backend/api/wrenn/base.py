"""What every group of Wrenn routes shares: the capsules, envd over HTTP, request parsing."""

from __future__ import annotations

import time
from typing import Any

import httpx
from starlette.requests import Request

from backend.api.capsules import Capsules
from backend.api.rest import json_object
from backend.capsules.errors import CapsuleNotFound
from backend.capsules.models import Capsule, State
from backend.envd.protocol import auth_headers

from .errors import WrennError, invalid, invalid_state, not_found

TOUCH_INTERVAL_S = 5.0


class Base:
    def __init__(self, capsules: Capsules, envd: httpx.AsyncClient) -> None:
        self.capsules = capsules
        self.envd = envd
        self._touched: dict[str, float] = {}

    # -- capsules ----------------------------------------------------------------------------

    def find(self, capsule_id: str) -> Capsule:
        try:
            return self.capsules.get(capsule_id)
        except CapsuleNotFound:
            raise not_found(f"capsule {capsule_id} not found") from None

    def running(self, capsule_id: str) -> Capsule:
        """The capsule, which must be running (its envd answers); activity is recorded."""
        capsule = self.find(capsule_id)
        if capsule.state != State.RUNNING:
            hint = ": resume it first" if capsule.state == State.PAUSED else ""
            raise invalid_state(f"capsule {capsule_id} is {capsule.state}, not running{hint}")
        now = time.monotonic()
        if now - self._touched.get(capsule_id, 0.0) >= TOUCH_INTERVAL_S:
            # activity resets the auto-pause timer; the record is rewritten at most every 5 s
            self._touched[capsule_id] = now
            self.capsules.touch(capsule_id)
        return capsule

    # -- envd ---------------------------------------------------------------------------------

    async def envd_request(
        self,
        capsule: Capsule,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = 30.0,
    ) -> httpx.Response:
        try:
            return await self.envd.request(
                method,
                capsule.envd_url + path,
                json=json,
                params=params,
                headers=auth_headers(capsule.access_token),
                timeout=timeout,
            )
        except httpx.HTTPError as exc:
            raise envd_unreachable(capsule, exc) from None

    async def envd_json(
        self,
        capsule: Capsule,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        timeout: float | None = 30.0,
    ) -> Any:
        response = await self.envd_request(
            capsule, method, path, json=json, params=params, timeout=timeout
        )
        if response.status_code >= 400:
            raise envd_failure(response)
        return response.json()

    async def connect_rpc(self, capsule: Capsule, method: str, body: dict[str, Any]) -> Any:
        """A unary call of envd's Connect filesystem service (JSON codec)."""
        return await self.envd_json(capsule, "POST", f"/filesystem.Filesystem/{method}", json=body)


def envd_unreachable(capsule: Capsule, exc: Exception) -> WrennError:
    return WrennError(502, f"envd in capsule {capsule.id} did not answer: {exc!r}")


def envd_failure(response: httpx.Response) -> WrennError:
    """envd's (or its Connect façade's) error, with its message, as Wrenn's error: a client
    mistake keeps its 4xx; envd failing is a 502."""
    try:
        data = response.json()
        message = str(data.get("message") or data)
    except ValueError:
        message = response.text[:500] or f"HTTP {response.status_code}"
    status = response.status_code
    if status >= 500:
        return WrennError(502, f"envd failed: {message}")
    if status == 401:
        return WrennError(502, f"envd refused the capsule's token: {message}")
    return WrennError(status, message)


async def body_object(request: Request) -> dict[str, Any]:
    return await json_object(request)


def required_str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise invalid(f"{key} is required (a non-empty string)")
    return value


def optional_int(body: dict[str, Any], key: str, low: int, high: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid(f"{key} must be an integer in {low}..{high}")
    return value


def optional_str_map(body: dict[str, Any], key: str) -> dict[str, str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise invalid(f"{key} must be an object of strings")
    return dict(value)


def optional_str_list(body: dict[str, Any], key: str) -> list[str] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise invalid(f"{key} must be a list of strings")
    return list(value)
