"""Build a template from a recipe, with a layer cache like Docker's.

Every step's result is a hidden template, a *layer*, named `layer-<key>` where the key hashes
(the parent's key, the step's text, the content of what a COPY reads); the first parent is the
FROM template's identity (its image version, or its name and creation time). A build:

1. parses the recipe, resolves and hashes every COPY source (errors before any capsule);
2. finds the longest prefix of steps whose layers exist (none with `--no-cache`);
3. if steps remain, starts a capsule from the last cached layer (or FROM), marked as a build
   (backend/capsules/builds.py: a start-up after a killed build removes it), and runs each
   remaining step through envd: RUN and READY as streamed execs, COPY as a tar uploaded with
   envd's file API and unpacked as root, START as a process left running (then, as after READY,
   the layer waits up to 15 s for the guest's CPU to go quiet), ENV/WORKDIR/USER as
   envd's defaults (/init) and in the layer's record. After each step the capsule is saved
   as the step's layer (backend/capsules/copying.py: the capsule keeps running); ENV and USER
   change no file and no process, so their layer is hard links to the previous one's files
   with the new record (capsules from it get the defaults at /init);
4. installs NAME as hard links to the last layer's files: renamed into place only when
   complete, replacing an earlier NAME only when no capsule uses it.
A failing step destroys the build capsule and leaves the layers made so far (and NAME, if
it existed) as they were.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from backend import sparse
from backend.capsules import builds, copying
from backend.capsules.errors import CapsuleError
from backend.capsules.models import Capsule
from backend.capsules.templates import (
    TEMPLATE_RECORD,
    Template,
    TemplateInUse,
    TemplateNotFound,
    check_name,
    init_defaults,
)
from backend.envd import protocol as wire
from backend.recipes import oci, oci_base
from backend.recipes.context import CopyPlan, plan_copy, write_tar
from backend.recipes.parser import USER_NAME, Recipe, RecipeError, Step, parse
from backend.recipes.status import BuildStatus, StatusWriter

if TYPE_CHECKING:
    from backend.capsules.manager import CapsuleManager

LAYER_PREFIX = "layer-"
RUN_TIMEOUT_S = 3600.0
READY_INTERVAL_S = 0.5
READY_ATTEMPT_MIN_S = 10.0
START_SETTLE_S = 0.5
IDLE_CPU_PCT = 25.0
IDLE_DEADLINE_S = 15.0
TAIL_LINES = 20
MAX_RECIPE_BYTES = 1 << 20

Report = Callable[[str], None]


class BuildFailed(CapsuleError):
    """A step failed in the build capsule (which is destroyed; earlier layers stay)."""


@dataclass
class Defaults:
    """What later processes start with (envd's /init defaults), step by step."""

    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    user: str = ""

    @classmethod
    def of(cls, template: Template) -> Defaults:
        return cls(dict(template.env), template.workdir, template.user)

    @classmethod
    def of_image(cls, config: oci.OciConfig, report: Report) -> Defaults:
        """An OCI image's ENV, WORKDIR and USER (a numeric USER or `user:group` is not an
        account name envd can take: said, and left as root)."""
        user = config.user
        if user and not USER_NAME.fullmatch(user):
            report(f"the OCI image's USER {user!r} is not an account name: processes run as root")
            user = ""
        return cls(dict(config.env), config.workdir, user)

    def init_body(self) -> dict[str, Any]:
        return init_defaults(self.env, self.workdir, self.user)


@dataclass(frozen=True)
class BuildResult:
    template: Template
    steps: int
    cached: int
    """Steps whose layer was already there."""
    seconds: float
    noop: bool
    """NAME already was this exact build: nothing was written."""


def layer_name(key: str) -> str:
    return f"{LAYER_PREFIX}{key}"


def _key(parent: str, text: str) -> str:
    return hashlib.sha256(f"{parent}\n{text}".encode()).hexdigest()[:32]


class RecipeBuilder:
    def __init__(
        self,
        manager: CapsuleManager,
        progress: Report | None = None,
        output: Report | None = None,
    ) -> None:
        """`progress` gets a line per step (and per phase), `output` each line a step prints."""
        self.m = manager
        self.progress = progress or (lambda _line: None)
        self.output = output or (lambda _line: None)
        self._early: list[str] = []
        self._status: StatusWriter | None = None
        self._oci: oci_base.OciBase | None = None

    def _progress(self, line: str, step: int | None = None) -> None:
        self.progress(line)
        if self._status is not None:
            self._status.progress(line, step)
        else:
            self._early.append(line)

    def _output(self, line: str) -> None:
        self.output(line)
        if self._status is not None:
            self._status.output(line)

    # -- checks before anything starts --------------------------------------------------------

    def load(self, recipe_file: Path) -> Recipe:
        try:
            if recipe_file.stat().st_size > MAX_RECIPE_BYTES:
                raise RecipeError(f"{recipe_file} is over {MAX_RECIPE_BYTES >> 10} KiB")
            text = recipe_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read the recipe {recipe_file}: {exc}") from None
        try:
            return parse(text)
        except RecipeError as exc:
            raise RecipeError(f"{recipe_file}: {exc}") from None

    def plan(
        self, name: str, recipe_file: Path, context: Path | None
    ) -> tuple[Recipe, Template | None, list[str], dict[int, CopyPlan]]:
        """Everything checked: the recipe, its FROM template (None: an OCI image not imported
        yet), each step's layer key, and the COPY plans (by step index)."""
        check_name(name)
        if name.startswith(LAYER_PREFIX):
            raise RecipeError(f"template names starting with {LAYER_PREFIX!r} are for the cache")
        if self.m.templates.image(name) is not None:
            raise RecipeError(f"{name!r} is a built-in template (an image): choose another name")
        recipe = self.load(recipe_file)
        context = context if context is not None else recipe_file.parent
        if not context.is_dir():
            raise RecipeError(f"the build context {context} is not a directory")
        self._oci = None
        if recipe.oci_path is not None:
            source = oci_base.resolve_source(recipe_file, recipe.oci_path)
            try:
                self._oci = oci_base.OciBase(source, oci.inspect(source))
            except RecipeError as exc:
                raise RecipeError(
                    f"{recipe_file}: line {recipe.base_line}: FROM {recipe.base}: {exc}"
                ) from None
            config = self._oci.image.config
            for step in recipe.steps:
                if step.instruction == "START" and not step.command and not config.argv:
                    raise RecipeError(
                        f"{recipe_file}: line {step.line}: START with no command, but the "
                        "OCI image has no ENTRYPOINT or CMD"
                    )
            recipe = _with_image_start(recipe, config)
            base: Template | None = self.m.templates.image(self._oci.name)
            if base is not None and not oci_base.installed(self.m.paths, self._oci.image.digest):
                base = None  # imported on an older default image: imported again
        else:
            try:
                base = self.m.templates.get(recipe.base)
            except TemplateNotFound:
                raise RecipeError(
                    f"{recipe_file}: line {recipe.base_line}: FROM {recipe.base}: no such "
                    "template (see `wrenn-tui template list`)"
                ) from None
        copies: dict[int, CopyPlan] = {}
        for index, step in enumerate(recipe.steps):
            if step.instruction == "COPY":
                try:
                    copies[index] = plan_copy(step, context)
                except RecipeError as exc:
                    raise RecipeError(f"{recipe_file}: {exc}") from None
        keys: list[str] = []
        parent = self._base_identity(base)
        if self._oci is not None:
            accel = self.m.runtime(self.m.paths.image_dir(oci_base.BASE_IMAGE)).accel
            ident = oci_base.identity(self.m.paths, self._oci.image.digest)
            parent = f"{ident} 256m 1c {accel} none"
        for index, step in enumerate(recipe.steps):
            text = step.text
            if index in copies:
                text += f"\n{copies[index].digest}"
            parent = _key(parent, text)
            keys.append(parent)
        return recipe, base, keys, copies

    def _base_identity(self, base: Template | None) -> str:
        if base is None:
            return ""
        if base.builtin:
            accel = self.m.runtime(Path(base.image_dir)).accel
            return f"image {Path(base.image_dir).name} 256m 1c {accel} none"
        # a template rebuilt under the same name is another base
        return f"template {base.name} {base.created_at!r} {base.source}"

    # -- the build ----------------------------------------------------------------------------

    async def build(
        self,
        name: str,
        recipe_file: Path,
        context: Path | None = None,
        no_cache: bool = False,
    ) -> BuildResult:
        started = time.monotonic()
        self._early = []
        recipe, base, keys, copies = self.plan(name, recipe_file, context)
        steps = recipe.steps
        cached = 0
        if not no_cache:
            while cached < len(steps) and self._layer(keys[cached]) is not None:
                cached += 1
        for index in range(cached):
            self._progress(f"[{index + 1}/{len(steps)}] line {steps[index].line}: cached")
        if steps and cached == len(steps):
            existing = self.m.templates.user(name)
            if existing is not None and existing.layers and existing.layers[-1] == keys[-1]:
                self._progress(f"template {name} is up to date")
                return BuildResult(existing, len(steps), cached, time.monotonic() - started, True)
        with self.m.layout.work_dir("build") as work:
            status = BuildStatus(name, str(recipe_file), time.time(), cached, len(steps))
            status.log = list(self._early)
            self._status = StatusWriter(work, status)
            try:
                if cached < len(steps):
                    await self._run_steps(name, recipe, base, keys, copies, cached, work, no_cache)
                source = self._layer(keys[-1])
                if source is None:
                    raise BuildFailed(
                        f"build of {name}: its last layer vanished (pruned meanwhile?)"
                    )
                template = self._install(
                    work,
                    source,
                    replace(source, name=name, hidden=False, created_at=time.time()),
                )
            finally:
                self._status = None
        seconds = time.monotonic() - started
        self._progress(f"template {name} built in {seconds:.1f} s ({cached} cached step(s))")
        return BuildResult(template, len(steps), cached, seconds, False)

    def _layer(self, key: str) -> Template | None:
        return self.m.templates.user(layer_name(key))

    async def _run_steps(
        self,
        name: str,
        recipe: Recipe,
        base: Template | None,
        keys: list[str],
        copies: dict[int, CopyPlan],
        first: int,
        work: Path,
        no_cache: bool,
    ) -> None:
        steps = recipe.steps
        parent = self._layer(keys[first - 1]) if first else base
        from_image = first == 0 and self._oci is not None
        if from_image and parent is None:
            assert self._oci is not None
            await asyncio.to_thread(oci_base.import_image, self.m.paths, self._oci, self._progress)
            parent = self.m.templates.image(self._oci.name)
        if parent is None:
            raise BuildFailed(f"build of {name}: its base vanished (pruned meanwhile?)")
        what = "FROM " + recipe.base if not first else f"the cached step {first}"
        self._progress(f"starting the build capsule from {what}")
        capsule = await self.m.create(template=parent.name, labels=builds.labels(name, work))
        defaults = Defaults.of(parent)
        if from_image:
            assert self._oci is not None
            defaults = Defaults.of_image(self._oci.image.config, self._progress)
            init = defaults.init_body()
            if init:
                try:
                    await self._init(capsule, init, f"FROM {recipe.base}")
                except BuildFailed:
                    with contextlib.suppress(CapsuleError):
                        await self.m.destroy(capsule.id)
                    raise
        started: dict[str, str] = {}
        """START processes of this build: tag -> where."""
        try:
            for index in range(first, len(steps)):
                step = steps[index]
                self._progress(
                    f"[{index + 1}/{len(steps)}] line {step.line}: {_shown(step)}", step=index + 1
                )
                began = time.monotonic()
                where = f"step {index + 1}/{len(steps)} ({step.instruction} at line {step.line})"
                await self._step(capsule, step, copies.get(index), defaults, work, where)
                if step.instruction == "START":
                    started[_start_tag(step)] = where
                parent = await self._save_layer(
                    capsule, step, parent, keys[: index + 1], defaults, work, no_cache
                )
                try:
                    await self._check_started(capsule, started)
                except BuildFailed:
                    # the layer may hold a dead START process: it must not be reused
                    with contextlib.suppress(CapsuleError):
                        await self.m.template_remove(parent.name)
                    raise
                self._progress(
                    f"[{index + 1}/{len(steps)}] done in {time.monotonic() - began:.1f} s"
                )
        except BuildFailed:
            raise
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                where_full = f" ({exc.filename})" if exc.filename else ""
                raise BuildFailed(
                    f"build of {name} failed: the disk is full{where_full}; the layers made so "
                    "far are kept: free some space (`wrenn-tui template prune` removes unused "
                    "layers) and build again"
                ) from exc
            raise BuildFailed(f"build of {name} failed: {exc}") from exc
        except (CapsuleError, httpx.HTTPError) as exc:
            raise BuildFailed(f"build of {name} failed: {exc}") from exc
        finally:
            with contextlib.suppress(CapsuleError):
                await self.m.destroy(capsule.id)

    # -- steps --------------------------------------------------------------------------------

    async def _step(
        self,
        capsule: Capsule,
        step: Step,
        copy: CopyPlan | None,
        defaults: Defaults,
        work: Path,
        where: str,
    ) -> None:
        if step.instruction == "RUN":
            code, tail = await self._exec(capsule, step.command, RUN_TIMEOUT_S)
            if code != 0:
                raise BuildFailed(_failure(where, f"exited with {code}", tail))
        elif step.instruction == "COPY":
            assert copy is not None
            await self._copy(capsule, copy, work, where)
        elif step.instruction == "ENV":
            defaults.env.update(step.env)
            await self._init(capsule, {"envVars": dict(step.env)}, where)
        elif step.instruction == "WORKDIR":
            target = _quote(step.target)
            make = f"mkdir -p -- {target}"
            if defaults.user:
                owner = _quote(defaults.user)
                # as BuildKit does: a new WORKDIR belongs to the current USER
                make = f"[ -d {target} ] || {{ {make} && chown {owner}: {target}; }}"
            code, tail = await self._exec(capsule, make, 60, user="root", cwd="/")
            if code != 0:
                raise BuildFailed(_failure(where, f"mkdir exited with {code}", tail))
            defaults.workdir = step.target
            await self._init(capsule, {"defaultWorkdir": step.target}, where)
        elif step.instruction == "USER":
            defaults.user = step.target
            await self._init(capsule, {"defaultUser": step.target}, where)
        elif step.instruction == "START":
            await self._start(capsule, step, where)
            await self._settle(capsule)
        elif step.instruction == "READY":
            await self._ready(capsule, step, where)
            await self._settle(capsule)

    def _client(self, capsule: Capsule, timeout: float | None = 30.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=capsule.envd_url,
            headers=wire.auth_headers(capsule.access_token),
            timeout=httpx.Timeout(timeout, connect=10.0),
        )

    async def _init(self, capsule: Capsule, body: dict[str, Any], where: str) -> None:
        async with self._client(capsule) as client:
            response = await client.post("/init", json=body)
        if response.status_code >= 400:
            raise BuildFailed(f"{where} failed: {_envd_message(response)}")

    async def _exec(
        self,
        capsule: Capsule,
        command: str,
        timeout: float,
        *,
        user: str | None = None,
        cwd: str | None = None,
        echo: bool = True,
    ) -> tuple[int, list[str]]:
        """Run `command`, each output line to `output` as it comes; (exit code, last lines)."""
        body: dict[str, Any] = {"cmd": command, "timeout": timeout}
        if user:
            body["user"] = user
        if cwd:
            body["cwd"] = cwd
        tail: list[str] = []
        pending = {"stdout": "", "stderr": ""}

        def emit(line: str) -> None:
            tail.append(line)
            del tail[:-TAIL_LINES]
            if echo:
                self._output(line)

        code = -1
        async with (
            self._client(capsule, timeout=None) as client,
            client.stream("POST", "/exec", params={"stream": "1"}, json=body) as response,
        ):
            if response.status_code >= 400:
                await response.aread()
                message = _envd_message(response)
                return 127, [message]
            async for raw in response.aiter_lines():
                if not raw:
                    continue
                event = json.loads(raw)
                kind = event.get("type")
                if kind in pending:
                    text = pending[kind] + str(event.get("data", ""))
                    *lines, pending[kind] = text.split("\n")
                    for line in lines:
                        emit(line)
                elif kind == "exit":
                    code = int(event.get("exit_code", -1))
                    if event.get("timed_out"):
                        emit(f"(timed out after {timeout:.0f} s)")
        for rest in pending.values():
            if rest:
                emit(rest)
        return code, tail

    async def _copy(self, capsule: Capsule, plan: CopyPlan, work: Path, where: str) -> None:
        tar = work / f"copy-{plan.step.line}.tar"
        size = await asyncio.to_thread(write_tar, plan, tar)
        remote = f"/tmp/.wrenn-copy-{secrets.token_hex(6)}.tar"

        async def chunks() -> Any:
            with tar.open("rb") as f:
                while chunk := await asyncio.to_thread(f.read, 1 << 20):
                    yield chunk

        async with self._client(capsule, timeout=300) as client:
            response = await client.post(
                "/files",
                params={"path": remote, "username": "root"},
                content=chunks(),
                headers={"content-type": "application/octet-stream", "content-length": str(size)},
            )
        tar.unlink(missing_ok=True)
        if response.status_code >= 400:
            raise BuildFailed(f"{where}: upload failed: {_envd_message(response)}")
        unpack = _unpack_command(remote)
        code, tail = await self._exec(capsule, unpack, 600, user="root", cwd="/")
        if code != 0:
            raise BuildFailed(_failure(where, f"unpacking exited with {code}", tail))
        self._output(f"copied {len(plan.entries)} item(s), {size / 2**20:.1f} MiB")

    async def _start(self, capsule: Capsule, step: Step, where: str) -> None:
        tag = _start_tag(step)
        async with self._client(capsule) as client:
            response = await client.post("/processes", json={"cmd": step.command, "tag": tag})
            if response.status_code >= 400:
                raise BuildFailed(f"{where} failed: {_envd_message(response)}")
            await asyncio.sleep(START_SETTLE_S)
            info = (await client.get(f"/processes/{tag}")).json()
            if not info.get("alive"):
                tail = await self._process_output(client, tag)
                raise BuildFailed(
                    _failure(where, f"exited at once with {info.get('exit_code')}", tail)
                )
        self._output(f"started pid {info.get('pid')} (tag {tag}), left running")

    async def _settle(self, capsule: Capsule) -> None:
        """Wait (a bounded while) for the guest's CPU to go quiet before the layer is taken: a
        server caught half-way through its start-up would finish it in every capsule made from
        the template, slowing each one's first second."""
        deadline = time.monotonic() + IDLE_DEADLINE_S
        quiet = 0
        async with self._client(capsule) as client:
            while time.monotonic() < deadline and quiet < 2:
                await asyncio.sleep(1.0)
                response = await client.get("/metrics")
                busy = float(response.json().get("cpu_used_pct", 0.0))
                quiet = quiet + 1 if busy < IDLE_CPU_PCT else 0

    async def _check_started(self, capsule: Capsule, started: dict[str, str]) -> None:
        """Every START process still runs (checked after each layer is taken: one that died
        before the capture must not be in the template)."""
        if not started:
            return
        async with self._client(capsule) as client:
            for tag, where in started.items():
                info = (await client.get(f"/processes/{tag}")).json()
                if not info.get("alive"):
                    tail = await self._process_output(client, tag)
                    raise BuildFailed(_failure(where, f"exited with {info.get('exit_code')}", tail))

    async def _process_output(self, client: httpx.AsyncClient, tag: str) -> list[str]:
        lines: list[str] = []
        async with client.stream(
            "GET", f"/processes/{tag}/events", params={"encoding": "utf8"}
        ) as response:
            async for raw in response.aiter_lines():
                if raw:
                    event = json.loads(raw)
                    if event.get("type") in ("stdout", "stderr"):
                        lines.extend(str(event.get("data", "")).splitlines())
        return lines[-TAIL_LINES:]

    async def _ready(self, capsule: Capsule, step: Step, where: str) -> None:
        deadline = time.monotonic() + step.timeout_s
        attempts = 0
        while True:
            attempts += 1
            # an attempt started before the deadline may finish after it (a loaded guest is slow
            # to start a shell): its own exit code is what the error reports
            left = max(READY_ATTEMPT_MIN_S, deadline - time.monotonic())
            code, tail = await self._exec(capsule, step.command, left, echo=False)
            if code == 0:
                for line in tail:
                    self._output(line)
                self._output(f"ready after {attempts} attempt(s)")
                return
            if time.monotonic() + READY_INTERVAL_S > deadline:
                raise BuildFailed(
                    _failure(
                        where,
                        f"did not succeed within {step.timeout_s:.0f} s ({attempts} attempts; "
                        f"the last exited with {code})",
                        tail,
                    )
                )
            await asyncio.sleep(READY_INTERVAL_S)

    # -- layers -------------------------------------------------------------------------------

    async def _save_layer(
        self,
        capsule: Capsule,
        step: Step,
        parent: Template,
        keys: list[str],
        defaults: Defaults,
        work: Path,
        no_cache: bool,
    ) -> Template:
        name = layer_name(keys[-1])
        record: dict[str, Any] = {
            "hidden": True,
            "env": dict(defaults.env),
            "workdir": defaults.workdir,
            "user": defaults.user,
            "layers": list(keys),
        }
        existing = self.m.templates.user(name)
        if existing is not None:
            if not no_cache:
                return existing  # made meanwhile by another build of the same steps
            try:
                await self.m.template_remove(name)
            except TemplateInUse:
                return existing  # a capsule builds on it: keep it, it is the same step
        if not step.changes_state and not parent.builtin:
            layer = replace(parent, name=name, created_at=time.time(), **record)
            return self._install(work, parent, layer)
        template: Template = await copying.save_template(self.m, capsule.id, name, **record)
        return template

    def _install(self, work: Path, source: Template, record: Template) -> Template:
        """`record` under its name, as hard links to `source`'s files (read-only, never
        written again: sharing them is safe); an earlier template of that name is replaced
        only when no capsule uses it."""
        out = work / f"install-{secrets.token_hex(4)}"
        out.mkdir(mode=0o700)
        for part in Path(source.path).iterdir():
            if part.is_file() and part.name not in (TEMPLATE_RECORD, ".lock"):
                os.link(part, out / part.name)
        final = self.m.layout.template(record.name)
        record = replace(record, path=str(final))
        fd = os.open(out / TEMPLATE_RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        sparse.fsync_dir(out)
        doomed = None
        with self.m.templates.lock():
            if self.m.templates.image(record.name) is not None:
                raise BuildFailed(f"{record.name!r} is a built-in template (an image)")
            if final.exists():
                users = self.m.template_users(record.name)
                if users:
                    raise TemplateInUse(record.name, users)
                doomed = self.m.layout.work / f"removed-{record.name}-{secrets.token_hex(4)}"
                final.rename(doomed)
            out.rename(final)
            sparse.fsync_dir(final.parent)
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)
        return record


# -- prune ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneResult:
    removed: list[str]
    kept_in_use: list[str]
    freed: int


async def prune(m: CapsuleManager) -> PruneResult:
    """Remove the cached layers that no template was built from (and no capsule runs on)."""
    templates = m.templates.all(include_hidden=True)
    used = {
        layer_name(key) for t in templates if not t.builtin and not t.hidden for key in t.layers
    }
    removed: list[str] = []
    kept: list[str] = []
    freed = 0
    for t in templates:
        if not t.hidden or t.name in used:
            continue
        size = _unshared_bytes(Path(t.path))
        try:
            await m.template_remove(t.name)
        except TemplateInUse:
            kept.append(t.name)
            continue
        except TemplateNotFound:
            continue  # removed meanwhile
        removed.append(t.name)
        freed += size
    images, image_bytes = _prune_oci_images(m)
    return PruneResult(removed + images, kept, freed + image_bytes)


def _prune_oci_images(m: CapsuleManager) -> tuple[list[str], int]:
    """Imported OCI images (every version) that no template and no capsule builds on."""
    removed: list[str] = []
    freed = 0
    with m.templates.lock():
        saved = [t for t in m.templates.all(include_hidden=True) if not t.builtin]
        used = {Path(t.image_dir).resolve() for t in saved}
        used |= {Path(c.image_dir).resolve() for c in m.list_capsules()}
        for version in sorted(m.paths.images.glob(f"{oci_base.PREFIX}*@*")):
            if version.resolve() in used:
                continue
            freed += _unshared_bytes(version)
            shutil.rmtree(version, ignore_errors=True)
            removed.append(version.name)
        for link in m.paths.images.glob(f"{oci_base.PREFIX}*"):
            if link.is_symlink() and not link.exists():
                link.unlink()
    return removed, freed


def _unshared_bytes(directory: Path) -> int:
    """Bytes of the files under `directory` that no hard link elsewhere keeps."""
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                info = os.lstat(os.path.join(root, name))
                if info.st_nlink == 1:
                    total += info.st_blocks * 512
    return total


def _with_image_start(recipe: Recipe, config: oci.OciConfig) -> Recipe:
    """START with no command runs the image's ENTRYPOINT + CMD (as Docker joins them)."""
    steps = tuple(
        replace(step, command=shlex.join(config.argv))
        if step.instruction == "START" and not step.command
        else step
        for step in recipe.steps
    )
    return replace(recipe, steps=steps)


UNPACK_SCRIPT = (
    "import os, sys, tarfile\n"
    "with tarfile.open(sys.argv[1]) as t:\n"
    "    for m in t:\n"
    "        if not (m.isdir() and os.path.isdir('/' + m.name)):\n"
    "            t.extract(m, '/', numeric_owner=True)\n"
)
"""GNU tar's `-x --no-overwrite-dir --same-owner` in the agent's own Python: existing
directories keep their owner and mode, everything else is made as the tar says."""


def _unpack_command(remote: str) -> str:
    """Unpack a COPY's tar in the capsule with the agent disk's Python (the image may have no
    tar, or busybox's, which lacks GNU's options); with GNU tar on an image from before agent
    disks."""
    agent = "/.wrenn/lib/ld-linux-x86-64.so.2"
    python = (
        f"{agent} --library-path /.wrenn/lib $(echo /.wrenn/python/bin/python3.*) -I -S -c "
        + _quote(UNPACK_SCRIPT)
    )
    return (
        f"if [ -x {agent} ]; then {python} {remote}; "
        f"else tar -xf {remote} -C / --no-overwrite-dir --same-owner; fi; "
        f"code=$?; rm -f {remote}; exit $code"
    )


def _shown(step: Step) -> str:
    """The step as the progress line shows it (START with no command: what it runs)."""
    if step.instruction == "START" and not step.args:
        return f"START (the image's ENTRYPOINT + CMD: {step.command})"
    return step.text


def _start_tag(step: Step) -> str:
    return f"start-{step.line}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _envd_message(response: httpx.Response) -> str:
    try:
        body = response.json()
        return f"{body.get('message') or body} (HTTP {response.status_code})"
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"


def _failure(where: str, what: str, tail: list[str]) -> str:
    message = f"{where} {what}"
    if tail:
        message += "; its last output:\n  " + "\n  ".join(tail[-TAIL_LINES:])
    return message
