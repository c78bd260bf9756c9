"""The guest kernel: Debian's cloud kernel package, fetched with apt, unpacked, made bootable.

QEMU boots an uncompressed PVH `vmlinux` directly (the fastest path); Debian ships only the
compressed `vmlinuz`, whose payload is an LZ4 frame we extract.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from backend.image.errors import ImageBuildError
from backend.image.tools import run

LZ4_FRAME_MAGIC = b"\x02\x21\x4c\x18"  # legacy LZ4 frame, as the kernel's boot stub uses
ELF_MAGIC = b"\x7fELF"
APT_NOT_SANDBOXED = ["-o", "APT::Sandbox::User=root"]


@dataclass(frozen=True)
class Kernel:
    package: str
    version: str
    release: str
    vmlinux: Path
    modules: Path
    """lib/modules/<release> with a fresh modules.dep."""

    @classmethod
    def load(cls, root: Path) -> Kernel | None:
        try:
            info = json.loads((root / "kernel.json").read_text())
        except (OSError, ValueError):
            return None
        kernel = cls(
            package=info["package"],
            version=info["version"],
            release=info["release"],
            vmlinux=root / "vmlinux",
            modules=root / "modules" / info["release"],
        )
        return kernel if kernel.vmlinux.is_file() and kernel.modules.is_dir() else None


def resolve_package(meta_package: str) -> tuple[str, str]:
    """The concrete kernel package behind a meta package, and its candidate version."""
    hint = "run `apt-get update` (the package lists may be missing)"
    out = run(["apt-cache", "depends", meta_package], what=f"apt-cache depends {meta_package}")
    match = re.search(r"Depends:\s+(linux-image-\S+)", out)
    if not match:
        raise ImageBuildError(f"apt does not know the kernel package {meta_package}", hint)
    package = match.group(1)
    policy = run(["apt-cache", "policy", package], what=f"apt-cache policy {package}")
    version = re.search(r"Candidate:\s+(\S+)", policy)
    if not version or version.group(1) == "(none)":
        raise ImageBuildError(f"no installable version of {package}", hint)
    return package, version.group(1)


def extract_vmlinux(vmlinuz: Path, dest: Path) -> None:
    data = vmlinuz.read_bytes()
    offset = data.find(LZ4_FRAME_MAGIC)
    if offset < 0:
        raise ImageBuildError(f"{vmlinuz.name} holds no LZ4 payload; cannot extract vmlinux")
    payload = dest.with_suffix(".lz4")
    payload.write_bytes(data[offset:])
    # lz4 exits 1 on the bytes trailing the frame, after writing the whole kernel: check the result.
    import subprocess

    with dest.open("wb") as out:
        subprocess.run(["lz4", "-dc", str(payload)], stdout=out, stderr=subprocess.DEVNULL)
    payload.unlink()
    with dest.open("rb") as f:
        head = f.read(4)
    if head != ELF_MAGIC or dest.stat().st_size < 8 << 20:
        raise ImageBuildError(f"extracting vmlinux from {vmlinuz.name} failed (not an ELF image)")


def fetch_kernel(meta_package: str, dest: Path, work: Path) -> Kernel:
    """Download and unpack the kernel into `dest` (atomically: built in `work`, then renamed)."""
    package, version = resolve_package(meta_package)
    work.mkdir(parents=True)
    run(
        ["apt-get", *APT_NOT_SANDBOXED, "download", f"{package}={version}"],
        what=f"apt-get download {package}",
        cwd=work,
        hint="check that the Debian mirror is reachable and run `apt-get update`",
    )
    debs = list(work.glob("*.deb"))
    if len(debs) != 1:
        raise ImageBuildError(f"apt-get download {package} produced no .deb")
    unpacked = work / "root"
    run(["dpkg-deb", "-x", debs[0], unpacked], what=f"unpacking {debs[0].name}")
    vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"), None)
    if vmlinuz is None:
        raise ImageBuildError(f"{debs[0].name} contains no vmlinuz")
    release = vmlinuz.name.removeprefix("vmlinuz-")
    extract_vmlinux(vmlinuz, work / "vmlinux")
    run(["depmod", "-b", unpacked, release], what="depmod")
    (work / "modules").mkdir()
    shutil.move(unpacked / "lib" / "modules" / release, work / "modules" / release)
    shutil.copy2(unpacked / "boot" / f"config-{release}", work / "config")
    info = {"package": package, "version": version, "release": release}
    (work / "kernel.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(unpacked)
    debs[0].unlink()
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    work.rename(dest)
    kernel = Kernel.load(dest)
    assert kernel is not None
    return kernel
