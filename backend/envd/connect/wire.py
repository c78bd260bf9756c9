"""The Connect protocol over HTTP/1.1 with the JSON codec, as Starlette endpoints.

Unary: ``POST /<service>/<method>``, ``application/json`` in and out; an error is a JSON
``{"code", "message"}`` with the HTTP status the protocol assigns to its code.
Streams: ``application/connect+json``; every message is an envelope (1 flag byte, 4 length
bytes big-endian, the JSON); a server stream ends with an envelope flagged 0x02 holding
``{}`` or ``{"error": {...}}``, and its HTTP status is 200 even for errors.
Only the identity encoding is accepted: the E2B SDK never compresses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import struct
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from ..errors import ApiError
from ..validation import ascii_digits

log = logging.getLogger("envd.connect")

UNARY_JSON = "application/json"
STREAM_JSON = "application/connect+json"
MAX_MESSAGE = 16 * 1024 * 1024
FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
HEADER = struct.Struct(">BI")

HTTP_STATUS: dict[str, int] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

Json = dict[str, Any]


class RpcError(Exception):
    def __init__(self, code: str, message: str) -> None:
        assert code in HTTP_STATUS, code
        super().__init__(message)
        self.code = code
        self.message = message

    def to_json(self) -> Json:
        return {"code": self.code, "message": self.message}


def invalid(message: str) -> RpcError:
    return RpcError("invalid_argument", message)


def from_api_error(exc: ApiError) -> RpcError:
    """The Connect code for one of envd's own errors (same failure, the other façade)."""
    if exc.status == 409:
        # The SDK tells "gone" from "refused" by code: E2B forgets processes once they exit.
        code = {"tag_in_use": "already_exists", "not_running": "not_found"}.get(
            exc.code, "failed_precondition"
        )
    else:
        code = {
            400: "invalid_argument",
            401: "unauthenticated",
            403: "permission_denied",
            404: "not_found",
            413: "resource_exhausted",
            415: "invalid_argument",
            429: "resource_exhausted",
            507: "resource_exhausted",
            503: "unavailable",
        }.get(exc.status, "internal" if exc.status >= 500 else "unknown")
    return RpcError(code, exc.message)


def as_rpc_error(exc: BaseException, where: str) -> RpcError:
    if isinstance(exc, RpcError):
        return exc
    if isinstance(exc, ApiError):
        return from_api_error(exc)
    log.error("unhandled error in %s: %r", where, exc, exc_info=exc)
    return RpcError("internal", f"internal error: {exc!r}")


# -- proto3 JSON ------------------------------------------------------------------------------


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Msg:
    """Read access to one decoded JSON message, with proto3 JSON's rules: a field may come
    under its lowerCamelCase or its proto name, null means unset, numbers may be strings,
    bytes are base64 (standard or URL-safe, padding optional). Unknown fields are ignored."""

    def __init__(self, data: object, where: str = "request") -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise invalid(f"{where} must be a JSON object")
        self._data: dict[str, Any] = data
        self.where = where

    def get(self, name: str) -> object:
        value = self._data.get(camel(name))
        if value is None:
            value = self._data.get(name)
        return value

    def has(self, name: str) -> bool:
        return self.get(name) is not None

    def _bad(self, name: str, expected: str) -> RpcError:
        return invalid(f"{self.where}.{camel(name)} must be {expected}")

    def opt_str(self, name: str) -> str | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._bad(name, "a string")
        return value

    def text(self, name: str) -> str:
        return self.opt_str(name) or ""

    def opt_bool(self, name: str) -> bool | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._bad(name, "true or false")
        return value

    def opt_uint(self, name: str) -> int | None:
        value = self.get(name)
        if value is None:
            return None
        if isinstance(value, str) and ascii_digits(value.strip()):
            value = int(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self._bad(name, "a non-negative integer")
        return value

    def uint(self, name: str) -> int:
        value = self.opt_uint(name)
        return 0 if value is None else value

    def opt_bytes(self, name: str) -> bytes | None:
        value = self.get(name)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._bad(name, "base64 text")
        text = value.replace("-", "+").replace("_", "/")
        try:
            return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (binascii.Error, ValueError):
            raise self._bad(name, "base64 text") from None

    def enum(self, name: str, values: Mapping[str, int]) -> int:
        value = self.get(name)
        if value is None:
            return 0
        if isinstance(value, str) and value in values:
            return values[value]
        if isinstance(value, int) and not isinstance(value, bool) and value in values.values():
            return value
        raise self._bad(name, f"one of {', '.join(values)}")

    def str_list(self, name: str) -> list[str]:
        value = self.get(name)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(name, "a list of strings")
        return list(value)

    def str_map(self, name: str) -> dict[str, str]:
        value = self.get(name)
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._bad(name, "an object of strings")
        return dict(value)

    def opt_msg(self, name: str) -> Msg | None:
        value = self.get(name)
        return None if value is None else Msg(value, f"{self.where}.{camel(name)}")

    def msg(self, name: str) -> Msg:
        return Msg(self.get(name), f"{self.where}.{camel(name)}")

    def oneof(self, *names: str) -> str | None:
        """Which member of a oneof is set (None: none); two set at once is an error."""
        present = [n for n in names if self.has(n)]
        if len(present) > 1:
            raise invalid(f"{self.where}: only one of {', '.join(map(camel, present))} may be set")
        return present[0] if present else None


# -- calls ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """What a handler may know about the request besides its message."""

    user: str | None
    deadline: float | None
    """``time.monotonic()`` value from Connect-Timeout-Ms, or None for no deadline."""
    keepalive: float | None
    """Seconds between keepalive messages the client asked for (E2B's header)."""

    def remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


def _user(request: Request) -> str | None:
    # E2B names the acting user as HTTP Basic credentials with an empty password.
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        raise RpcError("unauthenticated", "Authorization must be Basic base64(user:)")
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode()
    except (binascii.Error, ValueError):
        raise RpcError("unauthenticated", "Authorization is not valid base64") from None
    return decoded.partition(":")[0] or None


def _positive_seconds(request: Request, header: str, scale: float) -> float | None:
    raw = request.headers.get(header)
    if raw is None or raw == "":
        return None
    if not ascii_digits(raw, 10):
        raise invalid(f"header {header} must be a number of up to 10 digits")
    value = int(raw) * scale
    return value if value > 0 else None


def make_call(request: Request) -> Call:
    timeout = _positive_seconds(request, "connect-timeout-ms", 0.001)
    return Call(
        user=_user(request),
        deadline=None if timeout is None else time.monotonic() + timeout,
        keepalive=_positive_seconds(request, "keepalive-ping-interval", 1.0),
    )


Unary = Callable[[Msg, Call], Awaitable[Json]]
ServerStream = Callable[[Msg, Call], AsyncGenerator[Json, None]]
ClientStream = Callable[[AsyncIterator[Msg], Call], Awaitable[Json]]


@dataclass(frozen=True)
class UnaryRpc:
    handler: Unary


@dataclass(frozen=True)
class ServerStreamRpc:
    handler: ServerStream
    keepalive: Json | None = None
    """The message sent while the stream is idle for the client's keepalive interval."""


@dataclass(frozen=True)
class ClientStreamRpc:
    handler: ClientStream


Rpc = UnaryRpc | ServerStreamRpc | ClientStreamRpc


# -- encoding ---------------------------------------------------------------------------------


def dumps(message: Json) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return HEADER.pack(flags, len(payload)) + payload


def end_stream(error: RpcError | None = None) -> bytes:
    return envelope(dumps({} if error is None else {"error": error.to_json()}), FLAG_END_STREAM)


def unary_error(error: RpcError) -> Response:
    return Response(dumps(error.to_json()), HTTP_STATUS[error.code], media_type=UNARY_JSON)


def _media(request: Request) -> str:
    return request.headers.get("content-type", "").partition(";")[0].strip().lower()


def _check_encoding(request: Request, header: str) -> None:
    encoding = request.headers.get(header, "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise RpcError("unimplemented", f"{header} {encoding!r} is not supported: send identity")


def _decode(payload: bytes, where: str) -> Msg:
    try:
        data = json.loads(payload) if payload.strip() else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"{where} is not valid JSON: {exc}") from None
    except RecursionError:
        raise invalid(f"{where} is JSON nested too deeply") from None
    return Msg(data, where)


async def _read_body(request: Request) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_MESSAGE + HEADER.size:
                raise RpcError("resource_exhausted", f"messages are limited to {MAX_MESSAGE} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise RpcError("canceled", "the client went away while sending the request") from None
    return b"".join(chunks)


async def read_envelopes(chunks: AsyncIterator[bytes], where: str) -> AsyncIterator[Msg]:
    """Messages of a request stream as they arrive; an end-stream flag or EOF ends it."""
    buffer = bytearray()
    eof = False
    iterator = aiter(chunks)
    while True:
        while len(buffer) >= HEADER.size:
            flags, length = HEADER.unpack_from(buffer)
            if length > MAX_MESSAGE:
                raise RpcError("resource_exhausted", f"messages are limited to {MAX_MESSAGE} bytes")
            if len(buffer) < HEADER.size + length:
                break
            payload = bytes(buffer[HEADER.size : HEADER.size + length])
            del buffer[: HEADER.size + length]
            if flags & FLAG_COMPRESSED:
                raise RpcError("unimplemented", "compressed messages are not supported")
            if flags & FLAG_END_STREAM:
                return
            yield _decode(payload, where)
        if eof:
            if buffer:
                raise invalid(f"{where}: the stream ended inside a message")
            return
        try:
            buffer += await anext(iterator)
        except StopAsyncIteration:
            eof = True
        except ClientDisconnect:
            raise RpcError("canceled", "the client went away while sending") from None


async def _single_envelope(request: Request, where: str) -> Msg:
    messages = [m async for m in read_envelopes(_once(await _read_body(request)), where)]
    if len(messages) != 1:
        raise invalid(f"a server-streaming request carries one message, not {len(messages)}")
    return messages[0]


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


# -- the three kinds of call ------------------------------------------------------------------


async def _unary(rpc: UnaryRpc, request: Request, where: str) -> Response:
    try:
        if _media(request) != UNARY_JSON:
            raise RpcError("unimplemented", f"{where} speaks {UNARY_JSON} only")
        _check_encoding(request, "content-encoding")
        call = make_call(request)
        message = _decode(await _read_body(request), where)
        try:
            async with asyncio.timeout(call.remaining()):
                result = await rpc.handler(message, call)
        except TimeoutError:
            raise RpcError("deadline_exceeded", f"{where} ran out of time") from None
    except Exception as exc:
        return unary_error(as_rpc_error(exc, where))
    return Response(dumps(result), 200, media_type=UNARY_JSON)


async def _frames(
    source: AsyncGenerator[Json, None], call: Call, keepalive: Json | None, where: str
) -> AsyncIterator[bytes]:
    """A handler's messages as envelopes, with keepalives while idle and the deadline kept.

    The pending ``__anext__`` is waited on, never cancelled, between keepalives: cancelling
    it would end the handler's generator half-way.
    """
    pending: asyncio.Future[Json] | None = None
    interval = call.keepalive if keepalive is not None else None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(source))
            waits = [t for t in (interval, call.remaining()) if t is not None]
            done, _ = await asyncio.wait({pending}, timeout=min(waits) if waits else None)
            if not done:
                remaining = call.remaining()
                if remaining is not None and remaining <= 0:
                    yield end_stream(RpcError("deadline_exceeded", f"{where} ran out of time"))
                    return
                if keepalive is not None:
                    yield envelope(dumps(keepalive))
                continue
            finished, pending = pending, None
            try:
                message = finished.result()
            except StopAsyncIteration:
                yield end_stream()
                return
            except Exception as exc:
                yield end_stream(as_rpc_error(exc, where))
                return
            yield envelope(dumps(message))
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        await source.aclose()


def _stream_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(body, 200, media_type=STREAM_JSON)


async def _error_only(error: RpcError) -> AsyncIterator[bytes]:
    yield end_stream(error)


async def _server_stream(rpc: ServerStreamRpc, request: Request, where: str) -> Response:
    try:
        if _media(request) != STREAM_JSON:
            return unary_error(RpcError("unimplemented", f"{where} speaks {STREAM_JSON} only"))
        _check_encoding(request, "connect-content-encoding")
        call = make_call(request)
        message = await _single_envelope(request, where)
    except Exception as exc:
        return _stream_response(_error_only(as_rpc_error(exc, where)))
    return _stream_response(_frames(rpc.handler(message, call), call, rpc.keepalive, where))


async def _client_stream(rpc: ClientStreamRpc, request: Request, where: str) -> Response:
    try:
        if _media(request) != STREAM_JSON:
            return unary_error(RpcError("unimplemented", f"{where} speaks {STREAM_JSON} only"))
        _check_encoding(request, "connect-content-encoding")
        call = make_call(request)
        try:
            async with asyncio.timeout(call.remaining()):
                result = await rpc.handler(read_envelopes(request.stream(), where), call)
        except TimeoutError:
            raise RpcError("deadline_exceeded", f"{where} ran out of time") from None
    except Exception as exc:
        return _stream_response(_error_only(as_rpc_error(exc, where)))

    async def body() -> AsyncIterator[bytes]:
        yield envelope(dumps(result))
        yield end_stream()

    return _stream_response(body())


def service_routes(service: str, rpcs: Mapping[str, Rpc]) -> list[Route]:
    async def endpoint(request: Request) -> Response:
        name = request.path_params["method"]
        rpc = rpcs.get(name)
        where = f"{service}/{name}"
        if rpc is None:
            return unary_error(RpcError("unimplemented", f"{where} is not implemented"))
        if isinstance(rpc, UnaryRpc):
            return await _unary(rpc, request, where)
        if isinstance(rpc, ServerStreamRpc):
            return await _server_stream(rpc, request, where)
        return await _client_stream(rpc, request, where)

    return [Route(f"/{service}/{{method}}", endpoint, methods=["POST"])]


def timestamp(ns: int) -> str:
    """proto3 JSON Timestamp: RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos % 1_000_000 == 0 and nanos:
        text += f".{nanos // 1_000_000:03d}"
    elif nanos % 1000 == 0 and nanos:
        text += f".{nanos // 1000:06d}"
    elif nanos:
        text += f".{nanos:09d}"
    return text + "Z"
