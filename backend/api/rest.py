"""The E2B-compatible REST API over capsules (the routes and bodies the E2B SDK uses).

Every error is ``{"code": <HTTP status>, "message": str}``, the shape the SDK parses.
What an E2B client said at create time (template name, metadata, timeout, auto-pause) is
kept in the capsule's ``extra["e2b"]``, so it survives restarts and shows in
``wrenn-tui capsule get``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backend.capsules.errors import CapsuleError, CapsuleNotFound, IllegalTransition
from backend.capsules.models import Capsule, State
from backend.capsules.templates import (
    MAX_FORK,
    NAME_RULE,
    Template,
    TemplateExists,
    TemplateInUse,
    TemplateNotFound,
)

from .capsules import Capsules
from .keys import given_key, key_matches

log = logging.getLogger("wrenn.api")

ENVD_VERSION = "0.6.4"
"""What the SDK is told envd is: no SDK feature up to this version is gated off."""
CLIENT_ID = "wrenn-tui"
DEFAULT_TIMEOUT_S = 300
MAX_TIMEOUT_S = 86_400
"""The longest timeout a client may set (E2B's own maximum: 24 h); anything longer is a 400."""
TEMPLATE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""A template name: never a path (`../../x`)."""
MAX_PAGE = 1000
MAX_NEXT_TOKEN = 1_000_000
TEMPLATE_ALIASES = {"base": "default"}
"""E2B's default template name, and ours."""
DEFAULT_USER = "user"
DEFAULT_WORKDIR = "/home/user"
"""Who an E2B call acts as when it names no user, as in E2B's `base` (the image has the
account; the dashboard's shell and `capsule exec` stay root)."""
NO_END = "2999-12-31T23:59:59Z"
"""endAt of a capsule no E2B client gave a timeout: it never ends by itself."""
SETTLE_DEADLINE_S = 120.0
FROM_DISK = "resumeFromDisk"
"""In extra["e2b"]: paused without memory; the next resume boots on the paused disk."""
METRIC_BUCKET_S = 5
E2B = "e2b"

SHOWN = {
    State.PENDING: "running",
    State.RUNNING: "running",
    State.RESUMING: "running",
    State.PAUSING: "paused",
    State.PAUSED: "paused",
}
TRANSITIONAL = {State.PENDING, State.PAUSING, State.RESUMING}


class HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def iso(ts: float) -> str:
    try:
        return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
    except (ValueError, OverflowError, OSError):
        # A time no calendar holds (a record from before timeouts were bounded).
        return NO_END


def e2b_info(capsule: Capsule) -> dict[str, Any]:
    info = capsule.extra.get(E2B)
    return dict(info) if isinstance(info, dict) else {}


async def json_object(request: Request) -> dict[str, Any]:
    body = await request.body()
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the body must be a JSON object")
    return data


def opt_int(body: dict[str, Any], key: str, maximum: int = MAX_TIMEOUT_S) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= maximum:
        raise HttpError(400, f"{key} must be an integer from 0 to {maximum}")
    return value


def query_int(request: Request, key: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(key) or str(default)
    # ASCII digits only: int() also takes other scripts' digits, and no client means those.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or not low <= int(raw) <= high:
        raise HttpError(400, f"{key} must be an integer from {low} to {high}")
    return int(raw)


def guest_number(value: object, default: float, low: float = 0, high: float = 2**63) -> float:
    """A figure the guest reported (untrusted): a finite number in range, else `default`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return float(default)
    if not (math.isfinite(value) and low <= value <= high):
        return float(default)
    return float(value)


def str_map(body: dict[str, Any], key: str) -> dict[str, str]:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise HttpError(400, f"{key} must be an object of strings")
    return dict(value)


def rootfs_size_mb(capsule: Capsule) -> int:
    try:
        return (Path(capsule.image_dir) / "rootfs.ext4").stat().st_size >> 20
    except OSError:
        return 0


def query_time(request: Request, key: str) -> datetime | None:
    """An ISO 8601 time (naive: UTC) or unix seconds from the query string; 400 otherwise."""
    raw = request.query_params.get(key)
    if raw is None or raw == "":
        return None
    try:
        if re.fullmatch(r"[0-9]{1,11}", raw):
            return datetime.fromtimestamp(int(raw), UTC)
        value = datetime.fromisoformat(raw)
    except (ValueError, OverflowError):
        raise HttpError(400, f"{key} must be an ISO 8601 time or unix seconds") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def started(capsule: Capsule) -> datetime:
    """When the capsule started, exactly as `startedAt` shows it (microseconds)."""
    return datetime.fromtimestamp(capsule.started_at or capsule.created_at, UTC)


class Api:
    def __init__(self, capsules: Capsules, api_key: str) -> None:
        self.capsules = capsules
        self.api_key = api_key
        self.resuming: set[str] = set()
        """Sandboxes an E2B client is resuming: their old endAt must not end them meanwhile."""

    # -- bodies -----------------------------------------------------------------------------

    def sandbox(self, capsule: Capsule) -> dict[str, Any]:
        info = e2b_info(capsule)
        return {
            "templateID": info.get("templateID", capsule.template),
            "sandboxID": capsule.id,
            "clientID": CLIENT_ID,
            "envdVersion": ENVD_VERSION,
            "envdAccessToken": capsule.access_token,
            "alias": capsule.template,
            "domain": None,
        }

    def listed(self, capsule: Capsule) -> dict[str, Any]:
        info = e2b_info(capsule)
        end_at = info.get("endAt")
        return {
            "templateID": info.get("templateID", capsule.template),
            "alias": capsule.template,
            "sandboxID": capsule.id,
            "clientID": CLIENT_ID,
            "startedAt": iso(capsule.started_at or capsule.created_at),
            "endAt": iso(end_at) if isinstance(end_at, int | float) else NO_END,
            "cpuCount": capsule.vcpus,
            "memoryMB": capsule.memory_mib,
            "diskSizeMB": rootfs_size_mb(capsule),
            "state": SHOWN[capsule.state],
            "envdVersion": ENVD_VERSION,
            "metadata": info.get("metadata", {}),
        }

    def detail(self, capsule: Capsule) -> dict[str, Any]:
        return {
            **self.listed(capsule),
            "envdAccessToken": capsule.access_token,
            "domain": None,
            "allowInternetAccess": capsule.network == "internet",
        }

    # -- helpers ----------------------------------------------------------------------------

    def find(self, capsule_id: str) -> Capsule:
        try:
            capsule = self.capsules.get(capsule_id)
        except CapsuleNotFound:
            raise HttpError(404, f"sandbox {capsule_id} not found") from None
        if capsule.state not in SHOWN:
            raise HttpError(404, f"sandbox {capsule_id} not found: it is {capsule.state}")
        return capsule

    async def settled(self, capsule_id: str) -> Capsule:
        """The capsule once no lifecycle operation (e.g. a dashboard pause) is under way."""
        deadline = time.monotonic() + SETTLE_DEADLINE_S
        capsule = self.find(capsule_id)
        while capsule.state in TRANSITIONAL and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            capsule = self.find(capsule_id)
        return capsule

    async def set_timeout(self, capsule: Capsule, seconds: int, *, extend_only: bool) -> Capsule:
        info = e2b_info(capsule)
        end_at = time.time() + seconds
        current = info.get("endAt")
        if extend_only and isinstance(current, int | float) and current >= end_at:
            return capsule
        info.update(timeout=seconds, endAt=end_at)
        return await self.capsules.update_extra(capsule.id, E2B, info)

    async def resume(self, capsule: Capsule, timeout: int | None) -> Capsule:
        self.resuming.add(capsule.id)
        try:
            try:
                if e2b_info(capsule).get(FROM_DISK) is True:
                    capsule = await self.resume_from_disk(capsule)
                else:
                    capsule = await self.capsules.resume(capsule.id)
            except IllegalTransition:
                capsule = await self.settled(capsule.id)
                if capsule.state != State.RUNNING:
                    raise
            seconds = timeout if timeout is not None else e2b_info(capsule).get("timeout")
            if isinstance(seconds, int):
                capsule = await self.set_timeout(capsule, seconds, extend_only=False)
            return capsule
        finally:
            self.resuming.discard(capsule.id)

    async def resume_from_disk(self, capsule: Capsule) -> Capsule:
        """A filesystem-only pause ends with a boot on the paused disk; the new envd is told
        the E2B defaults again."""
        capsule = await self.capsules.resume_from_disk(capsule.id)
        await self.capsules.init_guest(
            capsule, {"defaultUser": DEFAULT_USER, "defaultWorkdir": DEFAULT_WORKDIR}
        )
        info = {k: v for k, v in e2b_info(capsule).items() if k != FROM_DISK}
        return await self.capsules.update_extra(capsule.id, E2B, info)

    async def pause_capsule(self, capsule: Capsule, keep_memory: bool) -> None:
        """Pause; without memory (E2B's filesystem-only pause) the next resume boots on the
        paused disk instead of restoring the memory."""
        await self.capsules.pause(capsule.id)
        info = e2b_info(self.capsules.get(capsule.id))
        if keep_memory:
            info.pop(FROM_DISK, None)
        else:
            info[FROM_DISK] = True
        await self.capsules.update_extra(capsule.id, E2B, info)

    # -- routes -----------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = await json_object(request)
        template_id = body.get("templateID")
        if not isinstance(template_id, str) or not template_id:
            raise HttpError(400, "templateID is required")
        if not TEMPLATE_ID.fullmatch(template_id):
            raise HttpError(
                400, "templateID is a name of letters, digits, '.', '_' and '-' (up to 64)"
            )
        template = TEMPLATE_ALIASES.get(template_id, template_id)
        if not self.capsules.has_template(template):
            raise HttpError(404, f"template {template_id!r} not found (`wrenn-tui image list`)")
        timeout = opt_int(body, "timeout")
        metadata = str_map(body, "metadata")
        env_vars = str_map(body, "envVars")
        internet = body.get("allow_internet_access", body.get("allowInternetAccess"))
        network = None if internet is None else "internet" if internet is True else "none"
        saved = self.user_template(template)
        if saved is not None and network is not None and network != saved.network:
            raise HttpError(
                400,
                f"template {template_id!r} was taken with network {saved.network!r}: a sandbox "
                f"made from it has the same (allow_internet_access={internet})",
            )
        capsule = await self.capsules.create(template=template, network=network)
        seconds = DEFAULT_TIMEOUT_S if timeout is None else timeout
        info = {
            "templateID": template_id,
            "metadata": metadata,
            "timeout": seconds,
            "endAt": time.time() + seconds,
            "autoPause": body.get("autoPause") is True,
            "autoPauseMemory": body.get("autoPauseMemory") is not False,
        }
        capsule = await self.adopt(capsule, info, env_vars)
        self.capsules.note(capsule.id, "e2b", f"created by an E2B client ({template_id})")
        return JSONResponse(self.sandbox(capsule), status_code=201)

    async def adopt(
        self, capsule: Capsule, info: dict[str, Any], env_vars: dict[str, str] | None = None
    ) -> Capsule:
        """Make a new capsule an E2B sandbox: E2B's default user and workdir, the client's
        environment, its E2B record; destroyed if any of that fails."""
        try:
            fields: dict[str, Any] = {
                "defaultUser": DEFAULT_USER,
                "defaultWorkdir": DEFAULT_WORKDIR,
            }
            if env_vars:
                fields["envVars"] = env_vars
            await self.capsules.init_guest(capsule, fields)
            return await self.capsules.update_extra(capsule.id, E2B, info)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.capsules.destroy(capsule.id)
            raise

    def user_template(self, name: str) -> Template | None:
        return next((t for t in self.capsules.snapshots() if t.name == name), None)

    async def connect(self, request: Request) -> Response:
        body = await json_object(request)
        timeout = opt_int(body, "timeout")
        capsule = await self.settled(request.path_params["sandbox_id"])
        if capsule.state == State.PAUSED:
            capsule = await self.resume(capsule, timeout)
            return JSONResponse(self.sandbox(capsule), status_code=201)
        if capsule.state != State.RUNNING:
            raise HttpError(409, f"sandbox {capsule.id} is {capsule.state}")
        if timeout is not None:
            capsule = await self.set_timeout(capsule, timeout, extend_only=True)
        return JSONResponse(self.sandbox(capsule), status_code=200)

    async def resume_legacy(self, request: Request) -> Response:
        body = await json_object(request)
        capsule = await self.settled(request.path_params["sandbox_id"])
        if capsule.state == State.RUNNING:
            raise HttpError(409, f"sandbox {capsule.id} is already running")
        capsule = await self.resume(capsule, opt_int(body, "timeout"))
        return JSONResponse(self.sandbox(capsule), status_code=201)

    async def pause(self, request: Request) -> Response:
        body = await json_object(request)
        memory = body.get("memory", True)
        if not isinstance(memory, bool):
            raise HttpError(400, "memory must be a boolean")
        capsule = await self.settled(request.path_params["sandbox_id"])
        if capsule.state == State.PAUSED:
            raise HttpError(409, f"sandbox {capsule.id} is already paused")
        try:
            await self.pause_capsule(capsule, keep_memory=memory)
        except IllegalTransition as exc:
            raise HttpError(409, str(exc)) from None
        return Response(status_code=204)

    async def kill(self, request: Request) -> Response:
        capsule_id = request.path_params["sandbox_id"]
        try:
            self.capsules.get(capsule_id)
        except CapsuleNotFound:
            raise HttpError(404, f"sandbox {capsule_id} not found") from None
        await self.capsules.destroy(capsule_id)
        return Response(status_code=204)

    async def info(self, request: Request) -> Response:
        return JSONResponse(self.detail(self.find(request.path_params["sandbox_id"])))

    def _filtered(self, request: Request, states: set[str]) -> list[Capsule]:
        wanted: dict[str, str] = {}
        raw_metadata = request.query_params.get("metadata")
        if raw_metadata:
            wanted = {unquote(k): unquote(v) for k, v in parse_qsl(raw_metadata)}
        template = request.query_params.get("template")
        started_after = query_time(request, "startedAfter")
        out = []
        for capsule in self.capsules.list():
            if SHOWN.get(capsule.state) not in states:
                continue
            if started_after is not None and started(capsule) < started_after:
                continue
            info = e2b_info(capsule)
            metadata = info.get("metadata", {})
            if any(metadata.get(k) != v for k, v in wanted.items()):
                continue
            if template and template not in (info.get("templateID"), capsule.template):
                continue
            out.append(capsule)
        return out

    async def list_v2(self, request: Request) -> Response:
        raw = ",".join(request.query_params.getlist("state"))
        states = {s.strip() for s in raw.split(",") if s.strip()} or {"running", "paused"}
        capsules = self._filtered(request, states)
        capsules.sort(
            key=lambda c: c.started_at or c.created_at,
            reverse=request.query_params.get("order", "desc") != "asc",
        )
        limit = query_int(request, "limit", 100, 1, MAX_PAGE)
        start = query_int(request, "nextToken", 0, 0, MAX_NEXT_TOKEN)
        page = capsules[start : start + limit]
        headers = {}
        if start + limit < len(capsules):
            headers["x-next-token"] = str(start + limit)
        return JSONResponse([self.listed(c) for c in page], headers=headers)

    async def list_v1(self, request: Request) -> Response:
        return JSONResponse([self.listed(c) for c in self._filtered(request, {"running"})])

    async def timeout(self, request: Request) -> Response:
        body = await json_object(request)
        seconds = opt_int(body, "timeout")
        if seconds is None:
            raise HttpError(400, "timeout is required")
        await self.set_timeout(
            self.find(request.path_params["sandbox_id"]), seconds, extend_only=False
        )
        return Response(status_code=204)

    async def refresh(self, request: Request) -> Response:
        body = await json_object(request)
        seconds = opt_int(body, "duration")
        capsule = self.find(request.path_params["sandbox_id"])
        await self.set_timeout(
            capsule, DEFAULT_TIMEOUT_S if seconds is None else seconds, extend_only=True
        )
        return Response(status_code=204)

    async def metrics(self, request: Request) -> Response:
        capsule = self.find(request.path_params["sandbox_id"])
        start = query_time(request, "start")
        end = query_time(request, "end")
        if capsule.state != State.RUNNING:
            return JSONResponse([])
        sample = await self.capsules.metrics(capsule)
        if sample is None:
            return JSONResponse([])
        ts = guest_number(sample.get("ts"), time.time(), 0, 1e11)
        # Only the current sample is served; it belongs to a range that ends (at second
        # precision, E2B buckets samples by 5 s) no earlier than it was taken.
        if (start is not None and ts < start.timestamp() - METRIC_BUCKET_S) or (
            end is not None and ts > end.timestamp() + METRIC_BUCKET_S
        ):
            return JSONResponse([])
        return JSONResponse(
            [
                {
                    "timestamp": iso(ts),
                    "timestampUnix": int(ts),
                    "cpuCount": int(guest_number(sample.get("cpu_count"), capsule.vcpus)),
                    "cpuUsedPct": guest_number(sample.get("cpu_used_pct"), 0.0, 0, 100),
                    "memUsed": int(guest_number(sample.get("mem_used"), 0)),
                    "memTotal": int(guest_number(sample.get("mem_total"), 0)),
                    "memCache": int(guest_number(sample.get("mem_cache"), 0)),
                    "diskUsed": int(guest_number(sample.get("disk_used"), 0)),
                    "diskTotal": int(guest_number(sample.get("disk_total"), 0)),
                }
            ]
        )

    # -- snapshots (user templates) and fork ---------------------------------------------------

    async def create_snapshot(self, request: Request) -> Response:
        body = await json_object(request)
        name = body.get("name")
        if name is None:
            name = f"snap-{secrets.token_hex(6)}"
        if not isinstance(name, str) or not NAME_RULE.fullmatch(name):
            raise HttpError(
                400,
                f"invalid snapshot name {name!r}: use 1-63 of a-z 0-9 . _ - , starting with a "
                "letter or digit",
            )
        memory = body.get("memory")
        if memory is not None and not isinstance(memory, bool):
            raise HttpError(400, "memory must be a boolean")
        capsule = await self.settled(request.path_params["sandbox_id"])
        try:
            template = await self.capsules.snapshot(capsule.id, name)
        except TemplateExists as exc:
            raise HttpError(409, str(exc)) from None
        self.capsules.note(capsule.id, "e2b", f"snapshot {name} taken by an E2B client")
        return JSONResponse(self.snapshot_info(template), status_code=201)

    @staticmethod
    def snapshot_info(template: Template) -> dict[str, Any]:
        return {"snapshotID": template.name, "names": [template.name]}

    async def list_snapshots(self, request: Request) -> Response:
        sandbox_id = request.query_params.get("sandboxID")
        name = request.query_params.get("name")
        found = [
            t
            for t in self.capsules.snapshots()
            if (not sandbox_id or t.source == sandbox_id) and (not name or t.name == name)
        ]
        found.sort(key=lambda t: t.created_at, reverse=True)
        limit = query_int(request, "limit", 100, 1, MAX_PAGE)
        start = query_int(request, "nextToken", 0, 0, MAX_NEXT_TOKEN)
        headers = {}
        if start + limit < len(found):
            headers["x-next-token"] = str(start + limit)
        page = found[start : start + limit]
        return JSONResponse([self.snapshot_info(t) for t in page], headers=headers)

    async def delete_template(self, request: Request) -> Response:
        name = request.path_params["template_id"]
        name = TEMPLATE_ALIASES.get(name, name)
        if self.user_template(name) is None:
            if self.capsules.has_template(name):
                raise HttpError(400, f"{name!r} is a built-in template; it cannot be deleted")
            raise HttpError(404, f"snapshot {name!r} not found")
        try:
            await self.capsules.delete_snapshot(name)
        except TemplateNotFound:
            raise HttpError(404, f"snapshot {name!r} not found") from None
        except TemplateInUse as exc:
            raise HttpError(409, str(exc)) from None
        return Response(status_code=204)

    async def fork(self, request: Request) -> Response:
        body = await json_object(request)
        count = body.get("count", 1)
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_FORK:
            raise HttpError(400, f"count must be an integer from 1 to {MAX_FORK}")
        timeout = opt_int(body, "timeout")
        source = await self.settled(request.path_params["sandbox_id"])
        clones = await self.capsules.fork(source.id, count)
        src = e2b_info(source)
        seconds = timeout if timeout is not None else src.get("timeout", DEFAULT_TIMEOUT_S)
        if not isinstance(seconds, int):
            seconds = DEFAULT_TIMEOUT_S
        results: list[dict[str, Any]] = []
        for clone in clones:
            info = {
                "templateID": src.get("templateID", source.template),
                "metadata": src.get("metadata", {}),
                "timeout": seconds,
                "endAt": time.time() + seconds,
                "autoPause": src.get("autoPause") is True,
                "forkOf": source.id,
            }
            try:
                adopted = await self.adopt(clone, info)
            except Exception as exc:
                results.append({"error": {"code": 500, "message": str(exc)}})
                continue
            self.capsules.note(adopted.id, "e2b", f"fork of {source.id} by an E2B client")
            results.append({"sandbox": self.sandbox(adopted)})
        return JSONResponse(results, status_code=201)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # -- plumbing ---------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        return key_matches(self.api_key, given_key(request))

    def guarded(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            if not self.authorized(request):
                return error(401, "Invalid API key: see `wrenn-tui api-key`")
            try:
                return await handler(request)
            except HttpError as exc:
                return error(exc.status, exc.message)
            except CapsuleNotFound as exc:
                return error(404, str(exc))
            except IllegalTransition as exc:
                return error(409, str(exc))
            except CapsuleError as exc:
                return error(500, str(exc))
            except Exception as exc:
                log.exception("%s %s failed", request.method, request.url.path)
                return error(500, f"internal error: {exc!r}")

        return endpoint

    def routes(self) -> list[Route]:
        g = self.guarded
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/sandboxes", g(self.create), methods=["POST"]),
            Route("/v2/sandboxes", g(self.create), methods=["POST"]),
            Route("/sandboxes", g(self.list_v1), methods=["GET"]),
            Route("/v2/sandboxes", g(self.list_v2), methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", g(self.info), methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", g(self.kill), methods=["DELETE"]),
            Route("/sandboxes/{sandbox_id}/pause", g(self.pause), methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/resume", g(self.resume_legacy), methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/connect", g(self.connect), methods=["POST"]),
            Route("/v2/sandboxes/{sandbox_id}/connect", g(self.connect), methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/timeout", g(self.timeout), methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/refreshes", g(self.refresh), methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/metrics", g(self.metrics), methods=["GET"]),
            Route("/sandboxes/{sandbox_id}/snapshots", g(self.create_snapshot), methods=["POST"]),
            Route("/snapshots", g(self.list_snapshots), methods=["GET"]),
            Route("/templates/{template_id}", g(self.delete_template), methods=["DELETE"]),
            Route("/sandboxes/{sandbox_id}/fork", g(self.fork), methods=["POST"]),
        ]

    # -- timeouts ---------------------------------------------------------------------------

    async def expire(self) -> None:
        """End the running capsules whose E2B timeout has passed: pause them when the client
        asked for auto-pause, destroy them otherwise (E2B's default)."""
        now = time.time()
        for capsule in self.capsules.list():
            if capsule.id in self.resuming:
                continue
            end_at = e2b_info(capsule).get("endAt")
            if capsule.state != State.RUNNING or not isinstance(end_at, int | float):
                continue
            if end_at > now:
                continue
            auto_pause = e2b_info(capsule).get("autoPause") is True
            try:
                if auto_pause:
                    self.capsules.note(capsule.id, "e2b", "E2B timeout reached: pausing")
                    keep = e2b_info(capsule).get("autoPauseMemory") is not False
                    await self.pause_capsule(capsule, keep_memory=keep)
                else:
                    self.capsules.note(capsule.id, "e2b", "E2B timeout reached: destroying")
                    await self.capsules.destroy(capsule.id)
            except CapsuleError as exc:
                log.warning("ending %s at its timeout failed: %s", capsule.id, exc)
