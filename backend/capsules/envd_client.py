"""The host's client for envd (see backend/envd/__init__.py for the API)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from backend.envd import protocol as wire


class EnvdError(Exception):
    """envd could not be reached or refused a request."""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: str
    stderr: str


class EnvdClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.token = token
        # A capsule is on this host: proxy settings from the environment never apply (they
        # would send the token to the proxy, and the request nowhere useful).
        self._client = httpx.AsyncClient(base_url=base_url, timeout=timeout, trust_env=False)

    async def __aenter__(self) -> EnvdClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(self) -> dict[str, str]:
        return wire.auth_headers(self.token)

    async def _request(
        self, method: str, path: str, *, json: Any = None, timeout: float | None = None
    ) -> httpx.Response:
        try:
            response = await self._client.request(
                method,
                path,
                json=json,
                headers=self._headers(),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.HTTPError as exc:
            raise EnvdError(f"envd at {self.base_url} unreachable: {exc!r}") from exc
        if response.status_code >= 400:
            raise EnvdError(
                f"envd {method} {path} -> HTTP {response.status_code}: {response.text[:300]}"
            )
        return response

    async def health(self, timeout: float = 2.0) -> dict[str, Any]:
        response = await self._request("GET", "/health", timeout=timeout)
        body: dict[str, Any] = response.json()
        return body

    async def wait_healthy(self, deadline_s: float, is_alive: Any = None) -> float:
        """Poll /health until it answers 200; returns seconds waited."""
        started = time.monotonic()
        last: Exception | None = None
        while time.monotonic() - started < deadline_s:
            if is_alive is not None and not is_alive():
                raise EnvdError("the VM exited before envd answered")
            try:
                await self.health(timeout=1.0)
                return time.monotonic() - started
            except EnvdError as exc:
                last = exc
            await asyncio.sleep(0.02)
        raise EnvdError(f"envd did not answer /health within {deadline_s:.0f} s ({last})")

    async def init(self, **body: Any) -> dict[str, Any]:
        response = await self._request("POST", "/init", json=body)
        return response.json() if response.content else {}

    async def metrics(self, timeout: float = 1.0) -> dict[str, Any]:
        response = await self._request("GET", "/metrics", timeout=timeout)
        body: dict[str, Any] = response.json()
        return body

    async def snapshot_prepare(self) -> dict[str, Any]:
        response = await self._request("POST", "/snapshot/prepare", timeout=30)
        body: dict[str, Any] = response.json()
        return body

    async def snapshot_abort(self) -> None:
        await self._request("POST", "/snapshot/abort")

    async def exec(
        self,
        cmd: str,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> ExecResult:
        body: dict[str, Any] = {"cmd": cmd, "timeout": timeout}
        if env:
            body["env"] = env
        if cwd:
            body["cwd"] = cwd
        response = await self._request("POST", "/exec", json=body, timeout=timeout + 10)
        data = response.json()
        return ExecResult(int(data["exit_code"]), str(data["stdout"]), str(data["stderr"]))
