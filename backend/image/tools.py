"""Running the host tools an image build needs, with errors a person can act on."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from backend.image.errors import ImageBuildError

# tool -> the Debian package that provides it
REQUIRED_TOOLS: dict[str, str] = {
    "apt-get": "apt",
    "dpkg-deb": "dpkg",
    "debootstrap": "debootstrap",
    "lz4": "lz4",
    "depmod": "kmod",
    "mkfs.ext4": "e2fsprogs",
    "cpio": "cpio",
    "chroot": "coreutils",
}
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")


def missing_tools() -> list[tuple[str, str]]:
    """(tool, package) for every required tool that is not on PATH."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    return [(t, p) for t, p in REQUIRED_TOOLS.items() if shutil.which(t, path=path) is None]


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        names = ", ".join(t for t, _ in missing)
        packages = " ".join(sorted({p for _, p in missing}))
        raise ImageBuildError(
            f"missing tools: {names}",
            f"run `make setup`, or apt-get install {packages}",
        )


def is_disk_full(exc: BaseException | str) -> bool:
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return "No space left on device" in str(exc)


def disk_full_error(where: Path) -> ImageBuildError:
    return ImageBuildError(
        f"the disk holding {where} is full",
        "free some space (the build needs about 3 GiB) or set WRENN_DATA_DIR/WRENN_CACHE_DIR",
    )


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    what: str,
    cwd: Path | None = None,
    hint: str = "",
    env: dict[str, str] | None = None,
    stdout: int | None = subprocess.PIPE,
) -> str:
    """Run a command; on failure raise an ImageBuildError naming the step and its output."""
    cmd = [os.fspath(a) for a in argv]
    full_env = {**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/sbin:/sbin"}
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=full_env, stdout=stdout, stderr=subprocess.PIPE, check=False
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{what}: {cmd[0]} not found", "run `make setup`") from exc
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(cwd or Path.cwd()) from exc
        raise ImageBuildError(f"{what}: {exc}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        tail = "\n".join(err.splitlines()[-12:])
        if is_disk_full(err):
            raise disk_full_error(cwd or Path.cwd())
        raise ImageBuildError(f"{what} failed (exit {proc.returncode}): {tail}", hint)
    return proc.stdout.decode(errors="replace") if proc.stdout is not None else ""


def mkfs_ext4(tree: Path, dest: Path, size_mib: int, label: str, *options: str) -> None:
    """An ext4 image of `size_mib` filled from `tree` (`mkfs.ext4 -d`: no loop mount), owned
    by root at its top; `options` are more mkfs.ext4 flags."""
    run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            label,
            *options,
            "-E",
            "root_owner=0:0",
            "-d",
            tree,
            dest,
            f"{size_mib}M",
        ],
        what=f"mkfs.ext4 ({label})",
    )


def find_static_busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file() and not elf_has_interpreter(path):
            return path
    raise ImageBuildError(
        "no statically linked busybox found", "run `make setup`, or apt-get install busybox-static"
    )


def elf_has_interpreter(path: Path) -> bool:
    """True when an ELF binary is dynamically linked (has a PT_INTERP program header)."""
    with path.open("rb") as f:
        header = f.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return True
        phoff = int.from_bytes(header[32:40], "little")
        phentsize = int.from_bytes(header[54:56], "little")
        phnum = int.from_bytes(header[56:58], "little")
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return any(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], "little") == pt_interp
        for i in range(phnum)
    )
