"""Where everything of a capsule lives on disk: the one owner of these paths.

<state>/capsules/<id>/            disk.qcow2 (overlay), qmp.sock, qemu.pid, console.log,
                                  qemu.log, metadata.json
<state>/snapshots/<id>/gen-NNNNNN/  one durable snapshot generation (backend/capsules/
                                  snapshots.py): mem, vmstate, disk.qcow2, snapshot.json;
                                  written as gen-NNNNNN.tmp and renamed
<state>/templates/<name>/         a user template (backend/capsules/templates.py)
<state>/work/<what>-<random>/     work in progress (a fork's shared capture, a template
                                  before its rename), locked (flock) by the process doing
                                  it; an unlocked one is a crash's leftover, removed at start
<shm>/wrenn-<uid>-<scope>/<id>.mem  guest RAM while the capsule runs, in a directory only
                                  this user can enter, created fresh (O_EXCL) every time
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from backend.capsules.errors import CapsuleError
from backend.config import Paths

GENERATION_PREFIX = "gen-"
TMP_SUFFIX = ".tmp"


class CapsuleLayout:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        scope = hashlib.sha256(str(paths.state.resolve()).encode()).hexdigest()[:8]
        self.ram_dir = paths.shm / f"wrenn-{os.geteuid()}-{scope}"
        """Guest RAM files: private to this agent's user, named per state dir."""

    # -- a capsule's run files ----------------------------------------------------------------

    def run_dir(self, capsule_id: str) -> Path:
        return self.paths.capsules / capsule_id

    def disk(self, capsule_id: str) -> Path:
        return self.run_dir(capsule_id) / "disk.qcow2"

    def console_log(self, capsule_id: str) -> Path:
        return self.run_dir(capsule_id) / "console.log"

    def vmm_log(self, capsule_id: str) -> Path:
        return self.run_dir(capsule_id) / "qemu.log"

    @staticmethod
    def agent_disk(image_dir: Path) -> Path | None:
        """The image's agent disk (envd, its Python, PID 1); None for an image built before
        agent disks, whose capsules and snapshots run without one."""
        path = image_dir / "agent.ext4"
        return path if path.is_file() else None

    def metadata_file(self, capsule_id: str) -> Path:
        return self.run_dir(capsule_id) / "metadata.json"

    def ram_file(self, capsule_id: str) -> Path:
        return self.ram_dir / f"{capsule_id}.mem"

    def ensure_ram_dir(self) -> Path:
        """The private RAM directory, made if missing. Refuses (CapsuleError) one that is not a
        real directory owned by this user with no access for anyone else: another local user
        who made it first must not get to read or replace guest memory."""
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.ram_dir, 0o700)
        info = os.lstat(self.ram_dir)
        if (
            not stat.S_ISDIR(info.st_mode)
            or info.st_uid != os.geteuid()
            or stat.S_IMODE(info.st_mode) & 0o077
        ):
            raise CapsuleError(
                f"{self.ram_dir} is not a private directory of this user (owner uid "
                f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); refusing to keep guest "
                "memory there. Remove it, or set WRENN_SHM_DIR to another directory"
            )
        return self.ram_dir

    def cleanup_run_files(self, capsule_id: str) -> None:
        """What only a running VM needs: its RAM file, disk copy, sockets and pid file."""
        self.ram_file(capsule_id).unlink(missing_ok=True)
        run_dir = self.run_dir(capsule_id)
        for name in ("disk.qcow2", "qmp.sock", "qemu.pid"):
            (run_dir / name).unlink(missing_ok=True)

    def remove(self, capsule_id: str) -> None:
        """Everything of a capsule: run dir, RAM and every snapshot generation."""
        self.cleanup_run_files(capsule_id)
        shutil.rmtree(self.run_dir(capsule_id), ignore_errors=True)
        shutil.rmtree(self.snapshot_dir(capsule_id), ignore_errors=True)

    # -- snapshot generations -------------------------------------------------------------------

    def snapshot_dir(self, capsule_id: str) -> Path:
        return self.paths.snapshots / capsule_id

    def generation(self, capsule_id: str, generation: int) -> Path:
        return self.snapshot_dir(capsule_id) / f"{GENERATION_PREFIX}{generation:06d}"

    def generation_ready(self, capsule_id: str, generation: int) -> bool:
        return (self.generation(capsule_id, generation) / "snapshot.json").is_file()

    def latest_generation(self, capsule_id: str) -> int:
        """The newest complete generation on disk (0: none)."""
        latest = 0
        directory = self.snapshot_dir(capsule_id)
        if directory.is_dir():
            for path in directory.glob(f"{GENERATION_PREFIX}*"):
                if path.suffix != TMP_SUFFIX and (path / "snapshot.json").is_file():
                    with contextlib.suppress(ValueError):
                        latest = max(latest, int(path.name.removeprefix(GENERATION_PREFIX)))
        return latest

    def remove_tmp_generations(self, capsule_id: str) -> None:
        directory = self.snapshot_dir(capsule_id)
        if directory.is_dir():
            for path in directory.glob(f"{GENERATION_PREFIX}*{TMP_SUFFIX}"):
                shutil.rmtree(path, ignore_errors=True)

    def remove_generations_except(self, capsule_id: str, keep: int) -> None:
        directory = self.snapshot_dir(capsule_id)
        if directory.is_dir():
            for path in directory.glob(f"{GENERATION_PREFIX}*"):
                if path != self.generation(capsule_id, keep):
                    shutil.rmtree(path, ignore_errors=True)

    # -- templates and work in progress ---------------------------------------------------------

    @property
    def templates(self) -> Path:
        return self.paths.state / "templates"

    def template(self, name: str) -> Path:
        return self.templates / name

    @property
    def work(self) -> Path:
        return self.paths.state / "work"

    def ensure(self) -> None:
        for directory in (self.templates, self.work):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            directory.chmod(0o700)

    @contextlib.contextmanager
    def work_dir(self, what: str) -> Iterator[Path]:
        """A private directory for work in progress, removed afterwards, and locked meanwhile
        so that another agent starting up does not take it for a crash's leftover."""
        self.ensure()
        path = self.work / f"{what}-{secrets.token_hex(4)}"
        path.mkdir(mode=0o700)
        fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)

    def remove_abandoned_work(self) -> list[Path]:
        """Work dirs no live process holds (the agent that made them died); returns them."""
        removed: list[Path] = []
        if not self.work.is_dir():
            return removed
        for path in self.work.iterdir():
            try:
                fd = os.open(path / ".lock", os.O_RDWR)
            except OSError:
                # no lock file: died before taking it, or is about to take it right now
                with contextlib.suppress(OSError):
                    if time.time() - path.stat().st_mtime < 10:
                        continue
                fd = None
            try:
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            finally:
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        return removed
