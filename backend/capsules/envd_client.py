"""The host's client for envd (see backend/envd/__init__.py for the API)."""

from __future__ import annotations

import asyncio
import json as json_module
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
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        timeout: float | None = None,
        limit: int = wire.MAX_SMALL_BODY,
    ) -> bytes:
        """The answer's body, read up to `limit` bytes: the guest is not trusted, and a body
        without end must not grow the agent (EnvdError beyond it)."""
        request = self._client.build_request(
            method,
            path,
            json=json,
            headers=self._headers(),
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )
        try:
            response = await self._client.send(request, stream=True)
            try:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        raise EnvdError(f"envd {method} {path}: answer larger than {limit} bytes")
                    chunks.append(chunk)
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise EnvdError(f"envd at {self.base_url} unreachable: {exc!r}") from exc
        body = b"".join(chunks)
        if response.status_code >= 400:
            text = body[:300].decode(errors="replace")
            raise EnvdError(f"envd {method} {path} -> HTTP {response.status_code}: {text}")
        return body

    async def _json(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        body = await self._request(method, path, **kwargs)
        if not body:
            return {}
        try:
            data = json_module.loads(body)
        except (ValueError, RecursionError):
            raise EnvdError(f"envd {method} {path}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise EnvdError(f"envd {method} {path}: the answer is not a JSON object")
        return data

    async def health(self, timeout: float = 2.0) -> dict[str, Any]:
        return await self._json("GET", "/health", timeout=timeout)

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
        return await self._json("POST", "/init", json=body)

    async def metrics(self, timeout: float = 1.0) -> dict[str, Any]:
        return await self._json("GET", "/metrics", timeout=timeout)

    async def snapshot_prepare(self) -> dict[str, Any]:
        return await self._json("POST", "/snapshot/prepare", timeout=30)

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
        data = await self._json(
            "POST", "/exec", json=body, timeout=timeout + 10, limit=wire.MAX_EXEC_BODY
        )
        try:
            return ExecResult(int(data["exit_code"]), str(data["stdout"]), str(data["stderr"]))
        except (KeyError, TypeError, ValueError):
            raise EnvdError("envd POST /exec: the answer lacks exit_code/stdout/stderr") from None
