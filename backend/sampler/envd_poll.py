"""GET /metrics from many envds at once, each over its own keep-alive connection.

Each capsule gets its own httpx connection pool (AsyncHTTPTransport) holding one keep-alive
connection. One pool for all capsules would be the obvious choice, but httpcore 1.0's pool
scans every pooled connection (with a nested scan per idle one) on each request start and
finish: with 120 capsules that measured ~1 s of CPU per round, against ~0.1 s for one pool
per capsule. The request goes to the transport directly rather than through AsyncClient,
whose redirect, cookie and auth layers envd never needs (skipping them saved 10-35% of the
sampler's CPU at 120 capsules in A/B runs); the request is built once per capsule and re-sent.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import ssl
import sys
from dataclasses import dataclass
from typing import Any

import httpx

from backend.sampler.models import Target

if importlib.util.find_spec("sniffio") is None:
    # httpcore imports sniffio inside a function run several times per request; when it is
    # not installed (anyio >= 4.11 no longer pulls it in) every call repeats a failed import
    # that searches sys.path, ~0.8 ms per request (encode/httpcore#1103). Recording the
    # absence makes the failure immediate; nothing changes for code that imports it.
    sys.modules.setdefault("sniffio", None)  # type: ignore[arg-type]

KEEPALIVE_S = 4.0
"""Below uvicorn's 5 s keep-alive, so envd never closes a connection as we reuse it."""

_PLAIN_HTTP_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
"""Never used (envd is plain HTTP), but shared: httpx otherwise builds and loads a CA store
per transport, ~10 ms each."""


class PollError(Exception):
    """envd gave no usable figures; the message is short enough for a status column."""


@dataclass
class _Endpoint:
    target: Target
    transport: httpx.AsyncHTTPTransport
    request: httpx.Request


class EnvdPoller:
    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.requests = 0
        """Requests sent so far (for requests/s)."""
        self._endpoints: dict[str, _Endpoint] = {}

    def __len__(self) -> int:
        return len(self._endpoints)

    async def _endpoint(self, target: Target) -> _Endpoint:
        endpoint = self._endpoints.get(target.capsule_id)
        if endpoint is not None:
            old = endpoint.target
            if old.envd_url == target.envd_url and old.token == target.token:
                return endpoint
            # A new port or token (a resume): the old connection leads nowhere useful.
            await self.drop(target.capsule_id)
        transport = httpx.AsyncHTTPTransport(
            verify=_PLAIN_HTTP_TLS,
            limits=httpx.Limits(
                max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_S
            ),
        )
        request = httpx.Request(
            "GET",
            target.envd_url.rstrip("/") + "/metrics",
            headers={"X-Access-Token": target.token} if target.token else None,
            extensions={"timeout": httpx.Timeout(self.timeout).as_dict()},
        )
        endpoint = _Endpoint(target, transport, request)
        self._endpoints[target.capsule_id] = endpoint
        return endpoint

    async def fetch(self, target: Target) -> dict[str, Any]:
        """envd's /metrics body; raises PollError within `timeout` seconds whatever happens."""
        endpoint = await self._endpoint(target)
        self.requests += 1
        try:
            # httpx's timeouts bound each socket operation; this bounds the whole exchange,
            # so a peer that trickles bytes cannot hold the tick either.
            async with asyncio.timeout(self.timeout):
                response = await endpoint.transport.handle_async_request(endpoint.request)
                try:
                    content = await response.aread()
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            raise PollError(f"no answer within {self.timeout:g} s") from None
        except httpx.ConnectError as exc:
            raise PollError(f"cannot connect: {_reason(exc)}") from None
        except httpx.HTTPError as exc:
            raise PollError(f"{type(exc).__name__}: {_reason(exc)}") from None
        if response.status_code != 200:
            raise PollError(f"HTTP {response.status_code}")
        try:
            body = json.loads(content)
        except ValueError:
            raise PollError("answer is not JSON") from None
        if not isinstance(body, dict):
            raise PollError("answer is not a JSON object")
        return body

    async def drop(self, capsule_id: str) -> None:
        endpoint = self._endpoints.pop(capsule_id, None)
        if endpoint is not None:
            await endpoint.transport.aclose()

    async def aclose(self) -> None:
        transports = [e.transport for e in self._endpoints.values()]
        self._endpoints.clear()
        await asyncio.gather(*(t.aclose() for t in transports), return_exceptions=True)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def figures(body: dict[str, Any]) -> tuple[int | None, int | None, int | None, float | None]:
    """(mem_used, mem_total, mem_cache, cpu_used_pct) from a /metrics body, None if absent."""

    def integer(key: str) -> int | None:
        value = body.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    total = integer("mem_total")
    used = integer("mem_used")
    if used is None:
        available = integer("mem_available")
        if total is not None and available is not None:
            used = max(0, total - available)
    cpu = body.get("cpu_used_pct")
    cpu_pct = float(cpu) if isinstance(cpu, int | float) and not isinstance(cpu, bool) else None
    return used, total, integer("mem_cache"), cpu_pct
