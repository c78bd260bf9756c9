"""Templates: named, immutable, restorable states that capsules start from.

Built-in templates are images (`default`, and any other installed image): a capsule starts
from the image's warm snapshot for its size (one per memory size, vCPUs, accelerator and
network mode, booted once and kept in `<image>/snapshots/<key>/`, recorded in the image
manifest), so `create` costs a restore, not a boot.

User templates are made from a capsule (`template create`, `fork`'s capture is the same
writer) and live in `<state>/templates/<name>/`: `mem`, `vmstate`, `snapshot.json` as every
snapshot (backend/capsules/snapshots.py), `disk.qcow2` flattened against the image's rootfs
(backend/capsules/disks.py), and `template.json`. They are written to a work directory and
renamed into place, so a crash never leaves half a template; capsules made from one get a
qcow2 overlay over its disk, so it cannot be removed while any capsule (running, paused or
failed) was made from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from backend import sparse
from backend.capsules import snapshots
from backend.capsules.disks import make_overlay
from backend.capsules.envd_client import EnvdError
from backend.capsules.errors import CapsuleError, CapsuleNotFound
from backend.capsules.guest import EnvdFactory
from backend.capsules.layout import CapsuleLayout
from backend.capsules.snapshots import CaptureSpec, SnapshotManifest
from backend.config import Paths
from backend.image.builder import ImageBuilder
from backend.image.manifest import MANIFEST_NAME
from backend.runtime import network as net
from backend.runtime.base import Runtime, VMConfig, VMMError
from backend.runtime.ports import free_port

BOOT_DEADLINE_S = 240.0
TEMPLATE_RECORD = "template.json"
NAME_RULE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
MAX_FORK = 16

Progress = Callable[[str], None]


class TemplateNotFound(CapsuleNotFound):
    pass


class TemplateExists(CapsuleError):
    pass


class TemplateInUse(CapsuleError):
    def __init__(self, name: str, capsules: list[str]) -> None:
        listed = ", ".join(capsules[:10]) + (" ..." if len(capsules) > 10 else "")
        super().__init__(
            f"template {name!r} is used by {len(capsules)} capsule(s): {listed}; destroy them first"
        )
        self.capsules = capsules


def check_name(name: str) -> str:
    if not NAME_RULE.fullmatch(name):
        raise CapsuleError(
            f"invalid template name {name!r}: use 1-63 of a-z 0-9 . _ - , starting with a "
            "letter or digit"
        )
    return name


def snapshot_key(memory_mib: int, vcpus: int, accel: str, network: str = "none") -> str:
    # slirp's migrated state only restores into the same network mode
    suffix = "" if network == "none" else f"-{network}"
    return f"{memory_mib}m-{vcpus}c-{accel}{suffix}"


def init_defaults(env: dict[str, str], workdir: str, user: str) -> dict[str, object]:
    """The /init fields (envVars, defaultWorkdir, defaultUser) for what is set of these."""
    body: dict[str, object] = {}
    if env:
        body["envVars"] = dict(env)
    if workdir:
        body["defaultWorkdir"] = workdir
    if user:
        body["defaultUser"] = user
    return body


@dataclass(frozen=True)
class Template:
    name: str
    builtin: bool
    """An image (any size starts warm from it) rather than a saved capsule."""
    source: str
    """The capsule it was made from, or the image version."""
    created_at: float
    image_dir: str
    """The exact image version the template's kernel and disk build on."""
    memory_mib: int = 0
    """0 for a built-in template (any size)."""
    vcpus: int = 0
    network: str = ""
    accel: str = ""
    allocated: int = 0
    """Bytes on disk (RAM, device state and disk; for an image: its files and snapshots)."""
    path: str = ""
    hidden: bool = False
    """A recipe build's cached layer (backend/recipes/): not listed unless asked for."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment, working directory and account of the capsules' processes (a recipe's
    ENV, WORKDIR and USER), given to envd's /init when a capsule starts from the template."""
    workdir: str = ""
    user: str = ""
    layers: list[str] = field(default_factory=list)
    """A recipe-built template's layer cache keys, FROM first (`template prune` keeps these)."""

    def process_defaults(self) -> dict[str, object]:
        """The /init fields that make env, workdir and user the capsules' defaults."""
        return init_defaults(self.env, self.workdir, self.user)

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("path")
        return json.dumps(data, indent=1)

    @classmethod
    def load(cls, directory: Path) -> Template | None:
        try:
            raw = json.loads((directory / TEMPLATE_RECORD).read_text())
            known = {f.name for f in fields(cls)}
            return cls(**{k: v for k, v in raw.items() if k in known}, path=str(directory))
        except (OSError, ValueError, TypeError):
            return None


class TemplateStore:
    """User templates on disk, and the installed images as built-in templates."""

    def __init__(self, paths: Paths, layout: CapsuleLayout) -> None:
        self.paths = paths
        self.layout = layout

    # -- reading ------------------------------------------------------------------------------

    def user(self, name: str) -> Template | None:
        if not NAME_RULE.fullmatch(name):
            return None
        return Template.load(self.layout.template(name))

    def image(self, name: str) -> Template | None:
        if not NAME_RULE.fullmatch(name):
            return None
        builder = ImageBuilder(self.paths, name)
        manifest = builder.installed()
        if manifest is None:
            return None
        image_dir = builder.image_dir.resolve()
        allocated = sum(f.allocated for f in manifest.files.values()) + _tree_allocated(
            image_dir / "snapshots"
        )
        return Template(
            name=name,
            builtin=True,
            source=f"image {manifest.version}",
            created_at=manifest.built_at,
            image_dir=str(image_dir),
            allocated=allocated,
            path=str(image_dir),
        )

    def get(self, name: str) -> Template:
        found = self.user(name) or self.image(name)
        if found is None:
            raise TemplateNotFound(f"no template {name!r} (see `wrenn-tui template list`)")
        return found

    def snapshot(self, template: Template) -> SnapshotManifest:
        manifest = SnapshotManifest.load(Path(template.path))
        if manifest is None:
            raise CapsuleError(f"template {template.name!r} is damaged: its snapshot is unreadable")
        return manifest

    def all(self, include_hidden: bool = False) -> list[Template]:
        images = [
            t
            for status in ImageBuilder(self.paths).list_images()
            if (t := self.image(status.name)) is not None
        ]
        users: list[Template] = []
        if self.layout.templates.is_dir():
            for directory in sorted(self.layout.templates.iterdir()):
                t = Template.load(directory) if directory.is_dir() else None
                if t is not None and (include_hidden or not t.hidden):
                    users.append(t)
        return images + users

    def check_new_name(self, name: str) -> None:
        check_name(name)
        if self.user(name) is not None or self.image(name) is not None:
            raise TemplateExists(f"a template named {name!r} exists already")

    # -- writing ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """Held exclusively to add or remove a template, shared while a capsule is being made
        from one (between looking it up and recording the capsule that depends on it)."""
        self.layout.ensure()
        fd = os.open(self.layout.templates / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def install(self, written: Path, template: Template) -> Template:
        """Move a complete template directory into place under its name (never over another)."""
        final = self.layout.template(template.name)
        record = replace(template, path=str(final))
        fd = os.open(written / TEMPLATE_RECORD, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(record.to_json())
            f.flush()
            os.fsync(f.fileno())
        sparse.fsync_dir(written)
        with self.lock():
            self.check_new_name(template.name)
            written.rename(final)
            sparse.fsync_dir(final.parent)
        return record

    def remove(self, name: str, dependents: Callable[[], list[str]]) -> None:
        """Remove a user template unless a capsule depends on it (TemplateInUse)."""
        if self.image(name) is not None and self.user(name) is None:
            raise CapsuleError(
                f"{name!r} is a built-in template (an image); it cannot be removed here"
            )
        with self.lock():
            if self.user(name) is None:
                raise TemplateNotFound(f"no template {name!r} (see `wrenn-tui template list`)")
            users = dependents()
            if users:
                raise TemplateInUse(name, users)
            doomed = self.layout.work / f"removed-{name}-{secrets.token_hex(4)}"
            self.layout.template(name).rename(doomed)
            sparse.fsync_dir(self.layout.templates)
        shutil.rmtree(doomed, ignore_errors=True)


def _tree_allocated(root: Path) -> int:
    total = 0
    if root.is_dir():
        for path in root.rglob("*"):
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_blocks * 512
    return total


# -- built-in templates: warm snapshots of images ------------------------------------------------


class WarmSnapshots:
    """One snapshot of the booted image per (memory size, vCPUs, accelerator, network mode),
    built the first time a size is asked for, in `<image>/snapshots/<key>/`."""

    def __init__(
        self,
        layout: CapsuleLayout,
        runtime: Callable[[Path], Runtime],
        envd: EnvdFactory,
    ) -> None:
        self.layout = layout
        self._runtime = runtime
        self._envd = envd

    def directory(self, image_dir: Path, key: str) -> Path:
        return image_dir / "snapshots" / key

    def load(self, image_dir: Path, key: str) -> SnapshotManifest | None:
        return SnapshotManifest.load(self.directory(image_dir, key))

    def discard(self, image_dir: Path, key: str) -> None:
        shutil.rmtree(self.directory(image_dir, key), ignore_errors=True)
        self._record(image_dir, key, None)

    async def ensure(
        self,
        image_dir: Path,
        memory_mib: int,
        vcpus: int,
        accel: str,
        network: str = "none",
        progress: Progress | None = None,
    ) -> SnapshotManifest:
        key = snapshot_key(memory_mib, vcpus, accel, network)
        existing = self.load(image_dir, key)
        if existing is not None:
            return existing
        async with self._build_lock(image_dir):
            # another process may have built it while we waited
            existing = self.load(image_dir, key)
            if existing is not None:
                return existing
            return await self._build(image_dir, key, memory_mib, vcpus, accel, network, progress)

    @contextlib.asynccontextmanager
    async def _build_lock(self, image_dir: Path) -> AsyncIterator[None]:
        (image_dir / "snapshots").mkdir(mode=0o700, exist_ok=True)
        fd = os.open(image_dir / "snapshots" / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.1)
            yield
        finally:
            os.close(fd)

    async def _build(
        self,
        image_dir: Path,
        key: str,
        memory_mib: int,
        vcpus: int,
        accel: str,
        network: str,
        progress: Progress | None,
    ) -> SnapshotManifest:
        report = progress or (lambda _msg: None)
        final = self.directory(image_dir, key)
        started = time.monotonic()
        runtime = self._runtime(image_dir)
        # envd is never tokenless: the template boots with a secret only this snapshot's
        # manifest (0600) keeps; every restore presents it to /init to set its own.
        token = secrets.token_urlsafe(24)
        with self.layout.work_dir(f"warm-{key}") as work:
            config = VMConfig(
                capsule_id=f"template-{key}",
                run_dir=work / "run",
                kernel=image_dir / "vmlinux",
                initrd=image_dir / "initrd.cpio.gz",
                disk=work / "disk.qcow2",
                ram_file=self.layout.ensure_ram_dir() / f"warm-{secrets.token_hex(8)}.mem",
                memory_mib=memory_mib,
                vcpus=vcpus,
                host_port=free_port(),
                metadata_json=json.dumps({"templateID": image_dir.name, "accessToken": token}),
                accel=accel,
                network=network,
                agent_disk=self.layout.agent_disk(image_dir),
            )
            netns = None
            if network == "internet":
                scope = net.scope_of(self.layout.paths.state)
                netns = net.netns_for(scope, f"tpl{os.getpid():05d}"[-8:], net.free_slot(set()))
                config = replace(config, netns=netns.name, forward_host=netns.ns_ip)
            vm = None
            try:
                config.run_dir.mkdir(mode=0o700)
                if netns is not None:
                    await asyncio.to_thread(net.setup_netns, scope, netns)
                report(f"booting the template ({memory_mib} MiB, {vcpus} vCPU, {accel})")
                await make_overlay(image_dir / "rootfs.ext4", config.disk)
                await asyncio.to_thread(sparse.create_holes, config.ram_file, memory_mib << 20)
                vm = await runtime.create(config)
                url = f"http://{config.forward_host}:{config.host_port}"
                async with self._envd(url, token, 30) as envd:
                    await envd.wait_healthy(BOOT_DEADLINE_S, vm.alive)
                    await envd.init(timestamp=time.time())
                    report("preparing the template snapshot")
                    spec = CaptureSpec(memory_mib, vcpus, network, accel, envd_token=token)
                    await snapshots.capture(
                        vm,
                        envd,
                        work / "snapshot",
                        spec,
                        ram_file=config.ram_file,
                        disk=config.disk,
                        keep_running=False,
                        release_balloon=True,
                    )
                await vm.quit()
                vm = None
                shutil.rmtree(final, ignore_errors=True)
                manifest = snapshots.commit(work / "snapshot", final)
                self._record(image_dir, key, manifest)
                report(f"template snapshot ready in {time.monotonic() - started:.1f} s")
                return manifest
            except (VMMError, EnvdError, OSError, net.NetworkUnavailable) as exc:
                raise CapsuleError(f"building the template snapshot {key} failed: {exc}") from exc
            finally:
                if vm is not None:
                    vm.kill()
                    await vm.wait_exit(5)
                config.ram_file.unlink(missing_ok=True)
                if netns is not None:
                    net.teardown_netns(netns)

    def _record(self, image_dir: Path, key: str, snap: SnapshotManifest | None) -> None:
        """Keep the image manifest's list of warm snapshots (and checksums) current."""
        manifest = image_dir / MANIFEST_NAME
        try:
            raw = json.loads(manifest.read_text())
        except (OSError, ValueError):
            return
        entries = raw.setdefault("template_snapshots", {})
        if snap is None:
            entries.pop(key, None)
        else:
            entry = asdict(snap)
            entry.pop("path")
            entry.pop("envd_token")
            entries[key] = entry
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")
        tmp.rename(manifest)
