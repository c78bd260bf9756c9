"""The root filesystem, in layers so that a change to envd re-packs in seconds.

base  : debootstrap minbase + python3, trimmed (cached by suite and package list; ~1 min)
wheels: envd's pinned dependencies as installed wheels (cached by requirements.txt)
pack  : the base tree plus an empty /.wrenn (where the agent disk is mounted), `mkfs.ext4 -d`
The agent disk (envd, its wheels, its own Python and PID 1) is backend/image/agent.py.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import httpx

from backend.config import settings
from backend.image.errors import ImageBuildError
from backend.image.tools import mkfs_ext4, run

TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/lib/apt/lists",
    "var/cache/apt",
    "var/log",
)
GUEST_HOSTNAME = "capsule"
SLIRP_DNS = "10.0.2.3"
USER_UID = 1000


def debian_mirror(suite: str) -> str:
    """The Debian mirror this host's apt uses for `suite` (or WRENN_DEBIAN_MIRROR)."""
    override = settings().debian_mirror
    if override:
        return override
    sources: list[Path] = [Path("/etc/apt/sources.list")]
    sources_dir = Path("/etc/apt/sources.list.d")
    if sources_dir.is_dir():
        sources += sorted(sources_dir.iterdir())
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for block in text.split("\n\n"):
                uris = re.search(r"^URIs:\s*(\S+)", block, re.M)
                suites = re.search(r"^Suites:\s*(.+)$", block, re.M)
                if uris and suites and suite in suites.group(1).split():
                    return uris.group(1)
        else:
            for line in text.splitlines():
                m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m and m.group(2) == suite:
                    return m.group(1)
    raise ImageBuildError(
        f"no Debian mirror for {suite!r} in this host's apt sources",
        "set WRENN_DEBIAN_MIRROR to a Debian mirror URL",
    )


def check_mirror(mirror: str, suite: str) -> None:
    url = f"{mirror.rstrip('/')}/dists/{suite}/Release"
    try:
        response = httpx.head(url, timeout=15, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise ImageBuildError(
            f"cannot reach the Debian mirror {mirror}: {exc}",
            "check the network, or set WRENN_DEBIAN_MIRROR to a reachable mirror",
        ) from exc
    if response.status_code != 200:
        raise ImageBuildError(
            f"the Debian mirror {mirror} has no {suite} (HTTP {response.status_code} for {url})",
            "set WRENN_DEBIAN_MIRROR to a Debian mirror URL",
        )


def build_base(
    suite: str,
    variant: str,
    packages: tuple[str, ...],
    mirror: str,
    user: str,
    dest: Path,
    work: Path,
) -> None:
    """debootstrap into `work`, trim it, configure the guest basics (and the ordinary account
    `user`, if any), rename to `dest`."""
    rootfs = work / "rootfs"
    work.mkdir(parents=True)
    run(
        [
            "debootstrap",
            f"--variant={variant}",
            f"--include={','.join(packages)}",
            suite,
            rootfs,
            mirror,
        ],
        what="debootstrap",
        hint=f"is {mirror} reachable? try `apt-get update`",
    )
    for rel in TRIM:
        target = rootfs / rel
        if target.is_dir():
            shutil.rmtree(target)
            target.mkdir(mode=0o755)
    (rootfs / "etc" / "hostname").write_text(f"{GUEST_HOSTNAME}\n")
    (rootfs / "etc" / "hosts").write_text(
        f"127.0.0.1 localhost\n127.0.1.1 {GUEST_HOSTNAME}\n::1 localhost\n"
    )
    resolv = rootfs / "etc" / "resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(f"nameserver {SLIRP_DNS}\n")
    (rootfs / "etc" / "fstab").write_text("# capsule: mounts are made by /sbin/wrenn-init\n")
    if user:
        add_user(rootfs, user)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work.rename(dest)


def add_user(rootfs: Path, user: str) -> None:
    """The account E2B's `base` template has: uid 1000, home /home/<user>, bash, passwordless
    sudo (a sudoers.d entry, mode 0440 as sudo requires)."""
    run(
        [
            "chroot",
            rootfs,
            "useradd",
            "--create-home",
            "--uid",
            str(USER_UID),
            "--user-group",
            "--shell",
            "/bin/bash",
            user,
        ],
        what=f"adding the user {user}",
    )
    sudoers = rootfs / "etc" / "sudoers.d" / user
    sudoers.parent.mkdir(mode=0o750, exist_ok=True)
    sudoers.write_text(f"{user} ALL=(ALL:ALL) NOPASSWD: ALL\n")
    sudoers.chmod(0o440)


def guest_python_version(base_rootfs: Path) -> str:
    versions = sorted(
        p.name.removeprefix("python")
        for p in (base_rootfs / "usr" / "lib").glob("python3.*")
        if re.fullmatch(r"python3\.\d+", p.name)
    )
    if not versions:
        raise ImageBuildError("the base root filesystem has no python3")
    return versions[-1]


def install_wheels(requirements: Path, python_version: str, dest: Path, work: Path) -> None:
    """Install envd's pinned wheels for the guest's Python into `dest` (via `work`)."""
    work.mkdir(parents=True)
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--no-compile",
            "--implementation",
            "cp",
            "--python-version",
            python_version,
            "--platform",
            "manylinux_2_17_x86_64",
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "any",
            "--target",
            work / "site",
            "-r",
            requirements,
        ],
        what="installing envd's wheels",
        hint="is PyPI reachable?",
    )
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work.rename(dest)


def copy_tree(src: Path, dest: Path) -> None:
    run(["cp", "-a", f"{src}/.", dest], what=f"copying {src.name}")


def pack(base: Path, size_mib: int, dest: Path, work: Path) -> None:
    """The image's root as an ext4 image: the base tree plus the agent disk's mount point."""
    tree = work / "tree"
    tree.mkdir(parents=True)
    copy_tree(base, tree)
    (tree / ".wrenn").mkdir(mode=0o755, exist_ok=True)
    mkfs_ext4(tree, dest, size_mib, "wrenn-root")
    shutil.rmtree(tree)
