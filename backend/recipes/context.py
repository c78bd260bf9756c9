"""COPY's sources: found inside the build context, hashed for the layer cache, packed as a tar.

A source is a path relative to the context dir. It must stay inside the context once every
symlink is resolved (`../x`, `/etc/passwd`, a symlink to `/` are refused), and so must every
symlink inside a copied directory. The hash covers what lands in the capsule (relative paths,
types, modes, contents, link targets), not timestamps: touching a file does not invalidate
the cache, changing one byte does.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from backend.recipes.parser import RecipeError, Step

CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    source: Path
    """On the host (a symlink entry: the link itself)."""
    member: str
    """The path in the capsule, without the leading `/`."""
    kind: str
    """file, dir or symlink."""
    mode: int
    link: str = ""


@dataclass(frozen=True)
class CopyPlan:
    step: Step
    entries: tuple[Entry, ...]
    digest: str

    @property
    def size(self) -> int:
        return sum(e.source.stat().st_size for e in self.entries if e.kind == "file")


def _inside(root: Path, path: Path) -> bool:
    return path == root or root in path.parents


def _escape(step: Step, src: str, why: str) -> RecipeError:
    return RecipeError(f"line {step.line}: COPY {src}: {why}; COPY reads only the build context")


def plan_copy(step: Step, context: Path) -> CopyPlan:
    """What COPY `step` puts where, checked against `context` (a RecipeError otherwise)."""
    root = context.resolve()
    entries: list[Entry] = []
    for src in step.sources:
        if any(ch in src for ch in "*?["):
            raise RecipeError(f"line {step.line}: COPY {src}: wildcards are not supported")
        relative = src.lstrip("/")
        if PurePosixPath(relative).is_absolute() or ".." in PurePosixPath(relative).parts:
            raise _escape(step, src, f"the path leaves the context {context}")
        lexical = root / relative
        if not lexical.exists() and not lexical.is_symlink():
            raise RecipeError(
                f"line {step.line}: COPY {src}: no such file in the context {context}"
            )
        real = lexical.resolve()
        if not _inside(root, real):
            raise _escape(step, src, f"it resolves to {real}, outside the context {context}")
        if real.is_dir():
            into = step.target.rstrip("/")
            entries.extend(_walk(step, src, root, real, into))
        elif real.is_file():
            into_dir = step.target.endswith("/")
            member = f"{step.target}{lexical.name}" if into_dir else step.target
            mode = stat.S_IMODE(real.stat().st_mode)
            entries.append(Entry(real, member.strip("/"), "file", mode))
        else:
            raise RecipeError(f"line {step.line}: COPY {src}: not a regular file or directory")
    for entry in entries:
        if not entry.member:
            raise RecipeError(f"line {step.line}: COPY: the destination cannot be `/` for a file")
    return CopyPlan(step, tuple(entries), _digest(step, entries))


def _walk(step: Step, src: str, root: Path, top: Path, into: str) -> list[Entry]:
    entries: list[Entry] = []
    if into:
        entries.append(Entry(top, into.strip("/"), "dir", stat.S_IMODE(top.stat().st_mode)))
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(dirnames) + sorted(filenames):
            path = here / name
            member = f"{into}/{path.relative_to(top)}".strip("/")
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(path)
                resolved = (path.parent / target).resolve()
                if not _inside(root, resolved):
                    raise _escape(step, src, f"{path.relative_to(root)} is a symlink to {resolved}")
                if name in dirnames:
                    dirnames.remove(name)  # os.walk would not follow it anyway
                entries.append(Entry(path, member, "symlink", 0o777, link=target))
            elif stat.S_ISDIR(info.st_mode):
                entries.append(Entry(path, member, "dir", stat.S_IMODE(info.st_mode)))
            elif stat.S_ISREG(info.st_mode):
                entries.append(Entry(path, member, "file", stat.S_IMODE(info.st_mode)))
            else:
                raise RecipeError(
                    f"line {step.line}: COPY {src}: {path.relative_to(root)} is not a regular "
                    "file, directory or symlink"
                )
    return entries


def _digest(step: Step, entries: list[Entry]) -> str:
    h = hashlib.sha256()
    h.update(step.target.encode() + b"\0")
    for e in entries:
        h.update(f"{e.member}\0{e.kind}\0{e.mode:o}\0{e.link}\0".encode())
        if e.kind == "file":
            with e.source.open("rb") as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            h.update(b"\0")
    return h.hexdigest()


def write_tar(plan: CopyPlan, out: Path) -> int:
    """Pack the plan's entries (owned by root, as COPY makes them); returns the tar's size."""
    with tarfile.open(out, "w", format=tarfile.GNU_FORMAT) as tar:
        for e in plan.entries:
            info = tarfile.TarInfo(e.member)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mode = e.mode
            info.mtime = int(e.source.lstat().st_mtime)
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type = tarfile.SYMTYPE
                info.linkname = e.link
                tar.addfile(info)
            else:
                with e.source.open("rb") as f:
                    info.size = os.fstat(f.fileno()).st_size
                    tar.addfile(info, f)
    return out.stat().st_size
