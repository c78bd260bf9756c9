"""Capsules and snapshots: create / list / get / destroy / pause / resume / ping, and
snapshot templates (``create_snapshot``; ``Capsule.create(template=NAME)`` starts from one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from backend.api.capsules import Capsules
from backend.api.rest import rootfs_size_mb
from backend.capsules.errors import CapsuleError, CapsuleNotFound, IllegalTransition
from backend.capsules.models import Capsule, State, new_capsule_id
from backend.capsules.templates import Template, TemplateInUse, check_name

from .base import Base, body_object, optional_int
from .bodies import (
    TEMPLATE_ALIASES,
    WRENN,
    capsule_body,
    metadata_field,
    template_body,
)
from .errors import WrennError, agent_error, conflict, invalid, invalid_state, not_found

log = logging.getLogger("wrenn.api.wrenn")

CREATE_WAIT_S = 20.0
"""How long create answers only once the capsule runs; after that it answers ``starting``
(the SDK's ``wait=True`` polls) so no client's 30 s read timeout is reached."""
MIN_TIMEOUT_S = 60
"""Wrenn clamps a positive inactivity TTL below this up to it (the agent's start envelope)."""
MAX_MEMORY_MB = 65536
MAX_VCPUS = 64


class Lifecycle(Base):
    def __init__(self, capsules: Capsules, envd: httpx.AsyncClient) -> None:
        super().__init__(capsules, envd)
        self._starting: set[asyncio.Task[Capsule]] = set()

    def template(self, name: str) -> Template | None:
        wanted = TEMPLATE_ALIASES.get(name, name)
        return next((t for t in self.capsules.list_templates() if t.name == wanted), None)

    def disk_size_mb(self, capsule: Capsule) -> int | None:
        return rootfs_size_mb(capsule) or None

    # -- capsules ----------------------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        body = await body_object(request)
        name = body.get("template")
        if name is None:
            name = "default"
        if not isinstance(name, str) or not name:
            raise invalid("template must be a non-empty string")
        vcpus = optional_int(body, "vcpus", 1, MAX_VCPUS)
        memory_mb = optional_int(body, "memory_mb", 64, MAX_MEMORY_MB)
        timeout = optional_int(body, "timeout_sec", 0, 2**31 - 1)
        metadata = metadata_field(body)
        template = self.template(name)
        if template is None:
            raise not_found(f"template {name!r} not found (GET /v1/snapshots lists them)")
        if not template.builtin:
            for asked, fixed, what in (
                (vcpus, template.vcpus, "vcpus"),
                (memory_mb, template.memory_mib, "memory_mb"),
            ):
                if asked is not None and asked != fixed:
                    raise invalid(
                        f"snapshot {template.name!r} was taken with {what}={fixed}; a capsule "
                        f"made from it has the same (asked for {asked})"
                    )
        auto_pause_s = 0 if not timeout else max(timeout, MIN_TIMEOUT_S)
        capsule_id = new_capsule_id()
        task = asyncio.create_task(
            self._create(template.name, memory_mb, vcpus, auto_pause_s, capsule_id, metadata),
            name=f"wrenn-create-{capsule_id}",
        )
        # The start goes on when this request ends first (a client timeout, or the answer
        # "starting" below): the task is kept until it ends, and a failure is logged.
        self._starting.add(task)
        task.add_done_callback(self._started)
        done, _ = await asyncio.wait({task}, timeout=CREATE_WAIT_S)
        if task in done:
            exc = task.exception()
            if isinstance(exc, CapsuleNotFound):
                raise not_found(str(exc))
            if isinstance(exc, CapsuleError):
                raise agent_error(f"create failed: {exc}")
            capsule = task.result()
        else:
            capsule = self.find(capsule_id)
        return JSONResponse(capsule_body(capsule), status_code=201)

    async def _create(
        self,
        template: str,
        memory_mb: int | None,
        vcpus: int | None,
        auto_pause_s: int,
        capsule_id: str,
        metadata: dict[str, str],
    ) -> Capsule:
        capsule = await self.capsules.create(
            template=template,
            network=None,
            memory_mib=memory_mb,
            vcpus=vcpus,
            auto_pause_s=auto_pause_s,
            capsule_id=capsule_id,
        )
        self.capsules.note(capsule.id, "wrenn", "created by a Wrenn client")
        if metadata:
            capsule = await self.capsules.update_extra(capsule.id, WRENN, {"metadata": metadata})
        return capsule

    def _started(self, task: asyncio.Task[Capsule]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("%s failed: %s", task.get_name(), task.exception())

    async def list_capsules(self, request: Request) -> Response:
        capsules = sorted(self.capsules.list(), key=lambda c: c.created_at, reverse=True)
        return JSONResponse([capsule_body(c) for c in capsules])

    async def get(self, request: Request) -> Response:
        capsule = self.find(request.path_params["id"])
        used = self.capsules.disk_allocated(capsule.id)
        return JSONResponse(
            capsule_body(
                capsule,
                disk_size_mb=self.disk_size_mb(capsule),
                disk_used_mb=None if used is None else used >> 20,
            )
        )

    async def destroy(self, request: Request) -> Response:
        capsule = self.find(request.path_params["id"])
        if capsule.state in (State.PENDING, State.PAUSING, State.RESUMING):
            raise invalid_state(
                f"capsule {capsule.id} is {capsule.state}: destroy it once that is done"
            )
        await self.capsules.destroy(capsule.id)
        return Response(status_code=204)

    async def pause(self, request: Request) -> Response:
        capsule = self.find(request.path_params["id"])
        if capsule.state != State.RUNNING:
            raise invalid_state(f"cannot pause capsule {capsule.id}: it is {capsule.state}")
        await self.capsules.pause(capsule.id)
        return JSONResponse(capsule_body(self.find(capsule.id)))

    async def resume(self, request: Request) -> Response:
        capsule = self.find(request.path_params["id"])
        if capsule.state != State.PAUSED:
            raise invalid_state(f"cannot resume capsule {capsule.id}: it is {capsule.state}")
        capsule = await self.capsules.resume(capsule.id)
        return JSONResponse(capsule_body(capsule))

    async def ping(self, request: Request) -> Response:
        capsule = self.find(request.path_params["id"])
        if capsule.state != State.RUNNING:
            raise invalid_state(f"capsule {capsule.id} is {capsule.state}, not running")
        self.capsules.touch(capsule.id)
        return Response(status_code=204)

    # -- snapshots (templates) -----------------------------------------------------------------

    async def snapshot_create(self, request: Request) -> Response:
        body = await body_object(request)
        capsule_id = body.get("sandbox_id", body.get("capsule_id"))
        if not isinstance(capsule_id, str) or not capsule_id:
            raise invalid("sandbox_id is required (the capsule to snapshot)")
        overwrite = request.query_params.get("overwrite", "false").lower()
        if overwrite not in ("true", "false", "1", "0", ""):
            raise invalid("overwrite must be true or false")
        capsule = self.find(capsule_id)
        name = body.get("name")
        if name is None:
            name = f"snapshot-{capsule.id.removeprefix('cl-')}-{int(time.time())}"
        if not isinstance(name, str):
            raise invalid("name must be a string")
        try:
            check_name(name)
        except CapsuleError as exc:
            raise invalid(str(exc)) from None
        if capsule.state not in (State.RUNNING, State.PAUSED):
            raise invalid_state(f"cannot snapshot capsule {capsule.id}: it is {capsule.state}")
        if name in TEMPLATE_ALIASES:
            raise conflict(f"{name!r} names the base template; choose another name")
        existing = self.template(name)
        if existing is not None:
            if existing.builtin:
                raise conflict(f"{name!r} is a base template; choose another name")
            if overwrite not in ("true", "1"):
                raise conflict(f"a snapshot named {name!r} exists (overwrite=true replaces it)")
            await self._remove_template(name)
        try:
            template = await self.capsules.template_create(capsule.id, name)
        except IllegalTransition as exc:
            raise invalid_state(str(exc)) from None
        except CapsuleError as exc:
            if "exists already" in str(exc):
                raise conflict(str(exc)) from None
            raise agent_error(f"snapshot failed: {exc}") from None
        return JSONResponse(template_body(template), status_code=201)

    async def snapshot_list(self, request: Request) -> Response:
        kind = request.query_params.get("type")
        if kind not in (None, "base", "snapshot"):
            raise invalid("type must be 'base' or 'snapshot'")
        bodies = [template_body(t) for t in self.capsules.list_templates()]
        return JSONResponse([b for b in bodies if kind is None or b["type"] == kind])

    async def snapshot_delete(self, request: Request) -> Response:
        name = request.path_params["name"]
        template = self.template(name) if name not in TEMPLATE_ALIASES else None
        if template is None:
            raise not_found(f"snapshot {name!r} not found")
        if template.builtin:
            raise WrennError(403, f"{name!r} is a protected base template; it cannot be deleted")
        await self._remove_template(name)
        return Response(status_code=204)

    async def _remove_template(self, name: str) -> None:
        try:
            await self.capsules.template_remove(name)
        except TemplateInUse as exc:
            raise conflict(str(exc)) from None
        except CapsuleNotFound:
            raise not_found(f"snapshot {name!r} not found") from None
        self.capsules.note(f"template:{name}", "template-removed", f"template {name} removed")

    def routes(self) -> list[Route]:
        return [
            Route("/v1/capsules", self.create, methods=["POST"]),
            Route("/v1/capsules", self.list_capsules, methods=["GET"]),
            Route("/v1/capsules/{id}", self.get, methods=["GET"]),
            Route("/v1/capsules/{id}", self.destroy, methods=["DELETE"]),
            Route("/v1/capsules/{id}/pause", self.pause, methods=["POST"]),
            Route("/v1/capsules/{id}/resume", self.resume, methods=["POST"]),
            Route("/v1/capsules/{id}/ping", self.ping, methods=["POST"]),
            Route("/v1/snapshots", self.snapshot_create, methods=["POST"]),
            Route("/v1/snapshots", self.snapshot_list, methods=["GET"]),
            Route("/v1/snapshots/{name}", self.snapshot_delete, methods=["DELETE"]),
        ]

    async def aclose(self) -> None:
        for task in list(self._starting):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), 1.0)
