"""The sandbox proxy: E2B's SDK sends every envd request to one URL and names the sandbox
in the ``E2b-Sandbox-Id`` header; this forwards it to that capsule's envd, streaming the
body both ways (commands, terminals and watches are long-lived streams).

A sandbox that is unknown or not running is a 502 whose message says it "was not found"
(what E2B's proxy answers, and what the SDK turns into its not-running error); a port other
than envd's is a 502 saying the "port is not open". The access token is envd's to check:
it travels through untouched.

The upstream URL is built from the capsule's host and port and the request's path, which must
start with ``/`` (a target such as ``@127.0.0.1:22/x`` is a 400 and nothing is connected). The
agent's own credentials never reach the guest: ``X-API-KEY`` and any ``Authorization`` other
than E2B's user identity (``Basic base64("<user>:")``, empty password) are dropped.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from backend.capsules.errors import CapsuleNotFound
from backend.capsules.models import Capsule, State
from backend.envd.protocol import ENVD_PORT, TOKEN_HEADER

from .capsules import Capsules

log = logging.getLogger("wrenn.api.proxy")

SANDBOX_ID_HEADER = "e2b-sandbox-id"
SANDBOX_PORT_HEADER = "e2b-sandbox-port"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
# The agent's credentials: never sent on to a guest.
CREDENTIAL_HEADERS = frozenset({"x-api-key", "cookie", "proxy-authorization"})
TOUCH_INTERVAL_S = 5.0


def bad_target(message: str) -> JSONResponse:
    return JSONResponse({"code": 400, "message": message}, status_code=400)


def is_user_identity(value: str) -> bool:
    """``Basic base64("<user>:")``: how E2B names the acting user to envd (no secret in it)."""
    scheme, _, encoded = value.partition(" ")
    if scheme.lower() != "basic":
        return False
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, ValueError):
        return False
    _user, colon, password = decoded.partition(":")
    return bool(colon) and password == ""


def forwarded_headers(request: Request) -> list[tuple[str, str]]:
    headers = []
    for name, value in request.headers.items():
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in CREDENTIAL_HEADERS:
            continue
        if lower == "authorization" and not is_user_identity(value):
            continue
        headers.append((name, value))
    return headers


def not_found(sandbox_id: str) -> JSONResponse:
    return JSONResponse(
        {
            "code": 502,
            "message": f"The sandbox {sandbox_id} was not found",
            "sandboxId": sandbox_id,
        },
        status_code=502,
    )


def port_closed(sandbox_id: str, port: str) -> JSONResponse:
    return JSONResponse(
        {
            "code": 502,
            "message": f"The sandbox {sandbox_id} is running but port is not open ({port})",
            "sandboxId": sandbox_id,
            "port": port,
        },
        status_code=502,
    )


def file_signature(fields: list[str], token: str, expiration: int | None) -> str:
    """E2B's v1 file URL signature: sha256 of `path:operation:user:token[:expiration]`."""
    raw = ":".join([*fields, token] + ([str(expiration)] if expiration is not None else []))
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode("ascii")


def signed_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


CONNECT_STREAM_TYPES = ("application/connect+json", "application/connect+proto")
END_STREAM_FLAG = 0x02


def is_connect_stream(headers: httpx.Headers) -> bool:
    return headers.get("content-type", "").split(";")[0].strip().lower() in CONNECT_STREAM_TYPES


class ConnectFraming:
    """Follows the envelopes (1 flag byte, 4 length bytes, message) of a Connect stream as
    it passes through, to know whether a cut fell between two messages."""

    def __init__(self) -> None:
        self._header = bytearray()
        self._remaining = 0
        self.ended = False

    def feed(self, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            if self._remaining:
                step = min(self._remaining, len(view))
                self._remaining -= step
                view = view[step:]
                continue
            need = 5 - len(self._header)
            self._header += view[:need]
            view = view[need:]
            if len(self._header) == 5:
                self.ended = self.ended or bool(self._header[0] & END_STREAM_FLAG)
                self._remaining = int.from_bytes(self._header[1:5], "big")
                self._header.clear()

    def at_boundary(self) -> bool:
        return not self._header and not self._remaining and not self.ended


def stream_cut_end(sandbox_id: str) -> bytes:
    """The end-of-stream message of a stream whose sandbox went away under it."""
    body = json.dumps(
        {
            "error": {
                "code": "unavailable",
                "message": f"the connection to sandbox {sandbox_id} ended before the stream "
                "completed",
            }
        }
    ).encode()
    return bytes([END_STREAM_FLAG]) + len(body).to_bytes(4, "big") + body


async def _gunzip(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    # envd stores upload bodies as they come; E2B's envd undoes Content-Encoding first.
    decompressor = zlib.decompressobj(wbits=31)
    async for chunk in chunks:
        data = decompressor.decompress(chunk)
        if data:
            yield data
    tail = decompressor.flush()
    if tail:
        yield tail


class SandboxProxy:
    def __init__(self, capsules: Capsules) -> None:
        self.capsules = capsules
        self.client = httpx.AsyncClient(
            # Streams (a running command, a terminal) last as long as the client wants.
            timeout=httpx.Timeout(connect=10.0, read=None, write=None, pool=None),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
            # Capsules are on loopback: a proxy from the environment must never be used.
            trust_env=False,
            follow_redirects=False,
        )
        self._touched: dict[str, float] = {}

    async def aclose(self) -> None:
        await self.client.aclose()

    def _touch(self, capsule_id: str) -> None:
        now = time.monotonic()
        if now - self._touched.get(capsule_id, 0.0) >= TOUCH_INTERVAL_S:
            self._touched[capsule_id] = now
            self.capsules.touch(capsule_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        response = await self.forward(request)
        await response(scope, receive, send)

    async def signed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A signed file URL (`download_url` / `upload_url`): the URL names no sandbox, the
        signature does (only the capsule whose token made it verifies it). Forwarded with
        that token, as a request from the SDK would be."""
        request = Request(scope, receive)
        found = self.verify_signature(request)
        if isinstance(found, Response):
            await found(scope, receive, send)
            return
        headers = [
            (n, v)
            for n, v in scope["headers"]
            if n not in (SANDBOX_ID_HEADER.encode(), TOKEN_HEADER.lower().encode())
        ]
        headers += [
            (SANDBOX_ID_HEADER.encode(), found.id.encode()),
            (TOKEN_HEADER.lower().encode(), found.access_token.encode()),
        ]
        await self(dict(scope, headers=headers), receive, send)

    def verify_signature(self, request: Request) -> Capsule | Response:
        params = request.query_params
        operation = {"GET": "read", "POST": "write"}.get(request.method)
        signature = params.get("signature", "")
        if operation is None:
            return signed_error(405, f"{request.method} is not allowed on a signed file URL")
        expiration: int | None = None
        raw_expiration = params.get("signature_expiration")
        if raw_expiration:
            if not raw_expiration.isascii() or not raw_expiration.lstrip("-").isdigit():
                return signed_error(400, "signature_expiration must be unix seconds")
            expiration = int(raw_expiration)
        fields = [params.get("path", ""), operation, params.get("username", "")]
        for capsule in self.capsules.list():
            if capsule.state != State.RUNNING or not capsule.access_token:
                continue
            expected = file_signature(fields, capsule.access_token, expiration)
            if hmac.compare_digest(expected.encode(), signature.encode()):
                if expiration is not None and expiration < time.time():
                    return signed_error(401, "signature is already expired")
                return capsule
        return signed_error(401, "invalid signature")

    async def forward(self, request: Request) -> Response:
        sandbox_id = request.headers.get(SANDBOX_ID_HEADER, "")
        raw_path: bytes = request.scope.get("raw_path") or request.url.path.encode()
        if not raw_path.startswith(b"/"):
            # Joined to envd's URL, "@host:port/x" would name another host.
            return bad_target("the request target must be a path starting with '/'")
        port = request.headers.get(SANDBOX_PORT_HEADER, str(ENVD_PORT)).strip()
        try:
            capsule = self.capsules.get(sandbox_id)
        except CapsuleNotFound:
            return not_found(sandbox_id)
        if capsule.state != State.RUNNING:
            return not_found(sandbox_id)
        if port != str(ENVD_PORT):
            return port_closed(sandbox_id, port)
        if capsule.auto_pause_s > 0:
            # Activity only matters to auto-pause; the record is rewritten only when it does.
            self._touch(capsule.id)

        headers = forwarded_headers(request)
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        body: AsyncIterator[bytes] | None = request.stream() if has_body else None
        encoding = request.headers.get("content-encoding", "").strip().lower()
        if body is not None and encoding == "gzip" and request.url.path == "/files":
            body = _gunzip(body)
            headers = [
                (n, v)
                for n, v in headers
                if n.lower() not in ("content-encoding", "content-length")
            ]
        query: bytes = request.scope.get("query_string", b"")
        # Host and port are the capsule's; the path goes as it came (percent-encoding
        # untouched), so envd sees what the SDK sent.
        url = httpx.URL(
            scheme="http",
            host=capsule.envd_host,
            port=capsule.host_port,
            raw_path=raw_path + (b"?" + query if query else b""),
        )
        upstream_request = self.client.build_request(
            request.method, url, headers=headers, content=body
        )
        try:
            upstream = await self.client.send(upstream_request, stream=True)
        except ClientDisconnect:
            return Response(status_code=499)
        except httpx.HTTPError as exc:
            log.info("envd of %s did not answer: %r", sandbox_id, exc)
            current = self._current_state(sandbox_id)
            if current != State.RUNNING:
                return not_found(sandbox_id)
            return port_closed(sandbox_id, port)
        response_headers = {
            name: value
            for name, value in upstream.headers.items()
            if name.lower() not in HOP_BY_HOP
        }

        framing = ConnectFraming() if is_connect_stream(upstream.headers) else None

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    if framing is not None:
                        framing.feed(chunk)
                    yield chunk
            except httpx.HTTPError as exc:
                # Mid-stream: the status is sent already. A Connect stream cut between two
                # messages ends as E2B's proxy ends it (UNAVAILABLE: the SDK then probes the
                # sandbox and reports it killed); anything else can only end early.
                log.info("stream from %s ended early: %r", sandbox_id, exc)
                if framing is not None and framing.at_boundary():
                    yield stream_cut_end(sandbox_id)
            finally:
                await upstream.aclose()

        return StreamingResponse(relay(), upstream.status_code, headers=response_headers)

    def _current_state(self, sandbox_id: str) -> State | None:
        try:
            return self.capsules.get(sandbox_id).state
        except CapsuleNotFound:
            return None
