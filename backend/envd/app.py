"""HTTP and WebSocket routes: a thin façade over :class:`~backend.envd.service.Envd`.

Only request parsing and response shaping live here; every decision is made in the
framework-free modules, so another protocol can be mounted beside this one later.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from . import __version__, connect
from .auth import AuthMiddleware
from .errors import STATUS_CODES, ApiError, bad_request
from .files import parse_metadata
from .processes import Encoding, ExecRequest, StartRequest
from .pty_ws import PtyConnection
from .service import Envd
from .state import InitRequest
from .tunnel import tcp_tunnel
from .users import Account
from .validation import Fields, ascii_digits, parse_signal

log = logging.getLogger("envd.app")

MAX_JSON_BODY = 8 * 1024 * 1024
NDJSON = "application/x-ndjson"


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status)


async def read_json(request: Request, *, allow_empty: bool = False) -> object:
    length = request.headers.get("content-length")
    if length is not None and ascii_digits(length) and int(length) > MAX_JSON_BODY:
        raise ApiError(
            413, "payload_too_large", f"JSON bodies are limited to {MAX_JSON_BODY} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_JSON_BODY:
                raise ApiError(
                    413, "payload_too_large", f"JSON bodies are limited to {MAX_JSON_BODY} bytes"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise bad_request(
            "the client went away while sending the body", "incomplete_body"
        ) from None
    body = b"".join(chunks)
    if not body.strip():
        if allow_empty:
            return {}
        raise bad_request("a JSON object body is required", "empty_body")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"body is not valid JSON: {exc}", "bad_json") from None
    except RecursionError:
        raise bad_request("body is JSON nested too deeply", "bad_json") from None


def query_flag(request: Request, name: str) -> bool:
    value = request.query_params.get(name, "").lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise bad_request(f"query parameter {name!r} must be 1/0 or true/false", "invalid_query")


def query_encoding(request: Request, default: Encoding) -> Encoding:
    value = request.query_params.get("encoding", default)
    if value == "base64":
        return "base64"
    if value in ("utf8", "utf-8"):
        return "utf8"
    raise bad_request("encoding must be 'base64' or 'utf8'", "invalid_query")


def ndjson(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for event in events:
            yield (json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n").encode()

    return StreamingResponse(body(), media_type=NDJSON, headers={"cache-control": "no-store"})


class Api:
    def __init__(self, envd: Envd) -> None:
        self.envd = envd

    def account(self, request: Request) -> Account:
        name = request.query_params.get("username") or None
        return self.envd.accounts.lookup(name, self.envd.state.default_user)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"version": __version__})

    async def version(self, request: Request) -> Response:
        return JSONResponse(self.envd.version())

    async def metrics(self, request: Request) -> Response:
        return JSONResponse(self.envd.metrics())

    async def init(self, request: Request) -> Response:
        body = InitRequest.parse(await read_json(request, allow_empty=True))
        return JSONResponse(await self.envd.init(body))

    async def snapshot_prepare(self, request: Request) -> Response:
        return JSONResponse(await self.envd.prepare_snapshot())

    async def snapshot_abort(self, request: Request) -> Response:
        return JSONResponse(self.envd.abort_snapshot())

    async def files_get(self, request: Request) -> Response:
        path = request.query_params.get("path")
        if not path:
            raise bad_request("query parameter 'path' is required", "invalid_path")
        download = self.envd.files.open_download(path, self.account(request))
        headers = {"content-disposition": f"attachment; filename*=UTF-8''{quote(download.name)}"}
        if download.size:
            # (a size of 0 may be a /proc file: streamed to its end, chunked)
            headers["content-length"] = str(download.size)
        return StreamingResponse(
            self.envd.files.stream(download),
            media_type="application/octet-stream",
            headers=headers,
        )

    async def files_post(self, request: Request) -> Response:
        account = self.account(request)
        path = request.query_params.get("path") or None
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";", 1)[0].strip().lower()

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in request.stream():
                    yield chunk
            except ClientDisconnect:
                raise bad_request(
                    "the client went away before the upload was complete", "incomplete_upload"
                ) from None

        metadata = parse_metadata(request.headers.items())
        if media == "multipart/form-data":
            result = await self.envd.files.upload_multipart(
                chunks(), content_type, path, account, metadata
            )
        elif media == "application/octet-stream":
            result = await self.envd.files.upload_raw(chunks(), path, account, metadata)
        else:
            raise ApiError(
                415,
                "unsupported_media_type",
                "upload as multipart/form-data (field 'file') or application/octet-stream",
            )
        return JSONResponse(result)

    async def processes_list(self, request: Request) -> Response:
        return JSONResponse([p.info() for p in self.envd.processes.list()])

    async def processes_start(self, request: Request) -> Response:
        body = StartRequest.parse(await read_json(request))
        process = self.envd.processes.start(body.command, stdin=body.stdin)
        return JSONResponse({"pid": process.pid, "tag": process.tag})

    async def process_info(self, request: Request) -> Response:
        return JSONResponse(self.envd.processes.get(request.path_params["ref"]).info())

    async def process_events(self, request: Request) -> Response:
        process = self.envd.processes.get(request.path_params["ref"])
        replay = query_flag(request, "replay") if "replay" in request.query_params else True
        encoding = query_encoding(request, "base64")
        return ndjson(process.events(replay=replay, encoding=encoding))

    async def process_stdin(self, request: Request) -> Response:
        process = self.envd.processes.get(request.path_params["ref"])
        f = Fields(await read_json(request))
        text = f.opt_str("data")
        raw = f.opt_b64("b64")
        if (text is None) == (raw is None):
            raise bad_request("give exactly one of 'data' (text) or 'b64' (base64 bytes)")
        data = text.encode() if text is not None else raw or b""
        process.write_stdin(data)
        return JSONResponse({"ok": True, "bytes": len(data)})

    async def process_close_stdin(self, request: Request) -> Response:
        process = self.envd.processes.get(request.path_params["ref"])
        process.close_stdin()
        return JSONResponse({"ok": True})

    async def process_signal(self, request: Request) -> Response:
        process = self.envd.processes.get(request.path_params["ref"])
        body = await read_json(request, allow_empty=True)
        sig = parse_signal(Fields(body).raw("signal", "SIGTERM"))
        process.send_signal(sig)
        return JSONResponse({"ok": True, "signal": sig.name})

    async def exec(self, request: Request) -> Response:
        body = ExecRequest.parse(await read_json(request))
        if query_flag(request, "stream"):
            encoding = query_encoding(request, "utf8")
            return ndjson(self.envd.processes.start_streaming(body, encoding))
        result = await self.envd.processes.run(body, self.envd.config.exec_output_limit)
        return JSONResponse(result.to_json())

    async def pty_list(self, request: Request) -> Response:
        return JSONResponse([s.info() for s in self.envd.ptys.list()])

    async def pty_socket(self, websocket: WebSocket) -> None:
        await PtyConnection(websocket, self.envd.ptys, self.envd.config.ping_interval).run()

    def routes(self) -> list[Route | WebSocketRoute]:
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/version", self.version, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/init", self.init, methods=["POST"]),
            Route("/snapshot/prepare", self.snapshot_prepare, methods=["POST"]),
            Route("/snapshot/abort", self.snapshot_abort, methods=["POST"]),
            Route("/files", self.files_get, methods=["GET"]),
            Route("/files", self.files_post, methods=["POST"]),
            Route("/processes", self.processes_list, methods=["GET"]),
            Route("/processes", self.processes_start, methods=["POST"]),
            Route("/processes/{ref}", self.process_info, methods=["GET"]),
            Route("/processes/{ref}/events", self.process_events, methods=["GET"]),
            Route("/processes/{ref}/stdin", self.process_stdin, methods=["POST"]),
            Route("/processes/{ref}/close-stdin", self.process_close_stdin, methods=["POST"]),
            Route("/processes/{ref}/signal", self.process_signal, methods=["POST"]),
            Route("/exec", self.exec, methods=["POST"]),
            Route("/pty", self.pty_list, methods=["GET"]),
            WebSocketRoute("/pty", self.pty_socket),
            WebSocketRoute("/tcp", tcp_tunnel),
        ]


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if exc.status_code != 404 else f"no route for {request.url.path}"
    return JSONResponse(
        {"error": code, "message": message}, status_code=exc.status_code, headers=exc.headers
    )


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("unhandled error in %s %s: %r", request.method, request.url.path, exc)
    return JSONResponse(
        {"error": "internal", "message": f"internal error: {exc!r}"}, status_code=500
    )


def create_app(envd: Envd) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await envd.start()
        # Everything imported so far lives forever; moving it out of the collector's view
        # keeps full collections (tens of ms on an emulated CPU) from stalling requests.
        gc.freeze()
        try:
            yield
        finally:
            await envd.stop()

    return Starlette(
        # The Connect RPC façade (the E2B SDK's protocol) on the same managers and port.
        routes=[*Api(envd).routes(), *connect.routes(envd)],
        middleware=[Middleware(AuthMiddleware, state=envd.state)],
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        lifespan=lifespan,
    )
