"""Inside a capsule, over its envd: commands (``/exec``, ``/processes``) and files (envd's
``/files`` for contents, streamed both ways; its Connect filesystem service for list, mkdir
and remove)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from backend.capsules.models import Capsule
from backend.envd.protocol import auth_headers

from .base import (
    Base,
    body_object,
    envd_failure,
    envd_unreachable,
    optional_int,
    optional_str_list,
    optional_str_map,
    required_str,
)
from .errors import WrennError, invalid

DEFAULT_EXEC_TIMEOUT_S = 30
MAX_EXEC_TIMEOUT_S = 24 * 3600
MULTIPART_PEEK_LIMIT = 64 * 1024
"""The part before the file (the ``path`` field) must fit in this much of the body."""
ENTRY_TYPES = {
    "FILE_TYPE_FILE": "file",
    "FILE_TYPE_DIRECTORY": "directory",
    "FILE_TYPE_SYMLINK": "symlink",
}
SIGNALS = ("SIGKILL", "SIGTERM")
_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?')
_FIELD_NAME = re.compile(rb'name="([^"]*)"')


def _command(body: dict[str, Any]) -> list[str]:
    cmd = required_str(body, "cmd")
    return [cmd, *(optional_str_list(body, "args") or [])]


def _unix(rfc3339: object) -> int | None:
    if not isinstance(rfc3339, str):
        return None
    try:
        return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return None


def file_entry(entry: dict[str, Any]) -> dict[str, Any]:
    """envd's Connect EntryInfo -> Wrenn's FileEntry."""
    kind = ENTRY_TYPES.get(str(entry.get("type")), "file")
    if entry.get("isSymlink"):
        kind = "symlink"
    try:
        size = int(entry.get("size") or 0)
    except ValueError:
        size = 0
    return {
        "name": entry.get("name"),
        "path": entry.get("path"),
        "type": kind,
        "size": size,
        "mode": entry.get("mode"),
        "permissions": entry.get("permissions"),
        "owner": entry.get("owner"),
        "group": entry.get("group"),
        "modified_at": _unix(entry.get("modifiedTime")),
        "symlink_target": entry.get("symlinkTarget"),
    }


class Guest(Base):
    # -- commands ------------------------------------------------------------------------------

    async def exec(self, request: Request) -> Response:
        capsule = self.running(request.path_params["id"])
        body = await body_object(request)
        argv = _command(body)
        envs = optional_str_map(body, "envs")
        cwd = body.get("cwd")
        if cwd is not None and not isinstance(cwd, str):
            raise invalid("cwd must be a string")
        background = body.get("background", False)
        if not isinstance(background, bool):
            raise invalid("background must be true or false")
        spec: dict[str, Any] = {"argv": argv}
        if envs:
            spec["env"] = envs
        if cwd:
            spec["cwd"] = cwd
        if background:
            tag = body.get("tag")
            if tag is not None:
                if not isinstance(tag, str) or not tag:
                    raise invalid("tag must be a non-empty string")
                spec["tag"] = tag
            started = await self.envd_json(capsule, "POST", "/processes", json=spec)
            return JSONResponse(
                {
                    "sandbox_id": capsule.id,
                    "cmd": " ".join(argv),
                    "pid": started["pid"],
                    "tag": started["tag"],
                },
                status_code=202,
            )
        timeout = optional_int(body, "timeout_sec", 1, MAX_EXEC_TIMEOUT_S)
        seconds = DEFAULT_EXEC_TIMEOUT_S if timeout is None else timeout
        result = await self.envd_json(
            capsule, "POST", "/exec", json={**spec, "timeout": seconds}, timeout=seconds + 30
        )
        return JSONResponse(
            {
                "sandbox_id": capsule.id,
                "cmd": " ".join(argv),
                "stdout": result.get("stdout", ""),
                "stderr": result.get("stderr", ""),
                "exit_code": result.get("exit_code", -1),
                "duration_ms": result.get("duration_ms"),
                "encoding": "utf-8",
            }
        )

    async def processes(self, request: Request) -> Response:
        capsule = self.running(request.path_params["id"])
        listed = await self.envd_json(capsule, "GET", "/processes")
        return JSONResponse(
            {
                "processes": [
                    {
                        "pid": p.get("pid"),
                        "tag": p.get("tag"),
                        "cmd": (p.get("argv") or [p.get("cmd")])[0],
                        "args": (p.get("argv") or [])[1:],
                    }
                    for p in listed
                    if p.get("alive")
                ]
            }
        )

    async def kill(self, request: Request) -> Response:
        capsule = self.running(request.path_params["id"])
        selector = request.path_params["selector"]
        signal = request.query_params.get("signal", "SIGKILL")
        if signal not in SIGNALS:
            raise invalid(f"signal must be one of {', '.join(SIGNALS)}")
        await self.envd_json(
            capsule, "POST", f"/processes/{selector}/signal", json={"signal": signal}
        )
        return Response(status_code=204)

    # -- files ---------------------------------------------------------------------------------

    async def _path(self, request: Request) -> tuple[Capsule, str, dict[str, Any]]:
        capsule = self.running(request.path_params["id"])
        body = await body_object(request)
        return capsule, required_str(body, "path"), body

    async def read(self, request: Request) -> Response:
        capsule, path, _ = await self._path(request)
        upstream_request = self.envd.build_request(
            "GET",
            capsule.envd_url + "/files",
            params={"path": path},
            headers=auth_headers(capsule.access_token),
        )
        try:
            upstream = await self.envd.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            raise envd_unreachable(capsule, exc) from None
        if upstream.status_code >= 400:
            await upstream.aread()
            await upstream.aclose()
            raise envd_failure(upstream)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            finally:
                await upstream.aclose()

        headers = {}
        if "content-length" in upstream.headers:
            headers["content-length"] = upstream.headers["content-length"]
        return StreamingResponse(body(), media_type="application/octet-stream", headers=headers)

    async def write(self, request: Request) -> Response:
        """A multipart upload (fields ``path``, then ``file``) passed on to envd as it
        arrives: envd writes it to a temporary file and renames it into place when complete,
        so nothing here holds the file, and a cut-off upload leaves nothing behind."""
        capsule = self.running(request.path_params["id"])
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise WrennError(
                415, "upload as multipart/form-data with the fields 'path' then 'file'"
            )
        found = _BOUNDARY.search(content_type.encode())
        if found is None:
            raise invalid("multipart body without a boundary")
        chunks = request.stream()
        head, path = await _peek_path(chunks, found.group(1))

        async def body() -> AsyncIterator[bytes]:
            yield head
            try:
                async for chunk in chunks:
                    yield chunk
            except ClientDisconnect:
                return  # envd sees an incomplete body and writes nothing

        try:
            response = await self.envd.post(
                capsule.envd_url + "/files",
                params={"path": path},
                content=body(),
                headers={**auth_headers(capsule.access_token), "content-type": content_type},
                timeout=httpx.Timeout(30.0, read=None, write=None),
            )
        except httpx.HTTPError as exc:
            raise envd_unreachable(capsule, exc) from None
        if response.status_code >= 400:
            raise envd_failure(response)
        written = response.json()
        return JSONResponse({"path": written[0]["path"] if written else path})

    async def list_dir(self, request: Request) -> Response:
        capsule, path, body = await self._path(request)
        depth = optional_int(body, "depth", 0, 64)
        listed = await self.connect_rpc(
            capsule, "ListDir", {"path": path, "depth": max(1, 1 if depth is None else depth)}
        )
        return JSONResponse({"entries": [file_entry(e) for e in listed.get("entries", [])]})

    async def make_dir(self, request: Request) -> Response:
        capsule, path, _ = await self._path(request)
        made = await self.connect_rpc(capsule, "MakeDir", {"path": path})
        return JSONResponse({"entry": file_entry(made["entry"])}, status_code=201)

    async def remove(self, request: Request) -> Response:
        capsule, path, _ = await self._path(request)
        await self.connect_rpc(capsule, "Remove", {"path": path})
        return Response(status_code=204)

    def routes(self) -> list[Route]:
        base = "/v1/capsules/{id}"
        return [
            Route(f"{base}/exec", self.exec, methods=["POST"]),
            Route(f"{base}/processes", self.processes, methods=["GET"]),
            Route(f"{base}/processes/{{selector}}", self.kill, methods=["DELETE"]),
            Route(f"{base}/files/read", self.read, methods=["POST"]),
            Route(f"{base}/files/write", self.write, methods=["POST"]),
            Route(f"{base}/files/list", self.list_dir, methods=["POST"]),
            Route(f"{base}/files/mkdir", self.make_dir, methods=["POST"]),
            Route(f"{base}/files/remove", self.remove, methods=["POST"]),
            Route(f"{base}/files/stream/read", self.read, methods=["POST"]),
            Route(f"{base}/files/stream/write", self.write, methods=["POST"]),
        ]


async def _peek_path(chunks: AsyncIterator[bytes], boundary: bytes) -> tuple[bytes, str]:
    """Read the body until its first part (the ``path`` field) is complete: (what was read,
    the path). The rest of the body is left in ``chunks``."""
    head = b""
    delimiter = b"--" + boundary
    try:
        async for chunk in chunks:
            head += chunk
            headers_end = head.find(b"\r\n\r\n")
            if headers_end >= 0:
                value_end = head.find(b"\r\n" + delimiter, headers_end + 4)
                if value_end >= 0:
                    if not head.startswith(delimiter):
                        raise invalid("malformed multipart body")
                    name = _FIELD_NAME.search(head[:headers_end])
                    if name is None or name.group(1) != b"path":
                        raise invalid("the multipart field 'path' must come before 'file'")
                    path = head[headers_end + 4 : value_end].decode("utf-8", errors="replace")
                    if not path:
                        raise invalid("path is required")
                    return head, path
            if len(head) > MULTIPART_PEEK_LIMIT:
                break
    except ClientDisconnect:
        raise invalid("the client went away before sending the path") from None
    if len(head) > MULTIPART_PEEK_LIMIT:
        raise invalid("the multipart field 'path' must come first and be short")
    raise invalid("the upload ended before the 'path' field was complete")
