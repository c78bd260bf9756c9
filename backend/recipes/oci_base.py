"""FROM oci:<path>: an OCI image becomes an image of ours, the base a recipe builds on.

Its root filesystem is the OCI image's layers (backend/recipes/oci.py) plus three things of ours,
written without following any link the image holds: an empty `/.wrenn` (the agent disk's mount
point), `/etc/resolv.conf` (slirp's DNS) and `/etc/hostname`. Kernel, initramfs and agent disk
are the default image's (hard links; backend/image/builder.py: install_derived), so envd and PID 1
never depend on the image's userland. The image is named `oci-<12 hex of the manifest digest>`
and its version is keyed by that digest and the default image's version: the same OCI image on
a rebuilt default image is imported again, an unchanged one is not.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backend.config import Paths
from backend.image.builder import ImageBuilder
from backend.image.errors import ImageBuildError
from backend.recipes import oci

BASE_IMAGE = "default"
PREFIX = "oci-"
GUEST_DNS = "10.0.2.3"
HOSTNAME = "capsule"


@dataclass(frozen=True)
class OciBase:
    source: Path
    image: oci.OciImage

    @property
    def name(self) -> str:
        return image_name(self.image.digest)


def image_name(digest: str) -> str:
    return PREFIX + digest.removeprefix("sha256:")[:12]


def resolve_source(recipe_file: Path, written: str) -> Path:
    path = Path(written).expanduser()
    return path if path.is_absolute() else recipe_file.parent / path


def identity(paths: Paths, digest: str) -> str:
    """The import's identity: the OCI manifest digest on the current default image."""
    base = ImageBuilder(paths, BASE_IMAGE).installed()
    if base is None:
        raise oci.OciError("no capsule image: run `wrenn-tui image build` first")
    return f"oci {digest} on image {base.version}"


def installed(paths: Paths, digest: str) -> bool:
    """The image of this digest exists on the current default image."""
    manifest = ImageBuilder(paths, image_name(digest)).installed()
    return manifest is not None and manifest.stage_keys.get("rootfs") == identity(paths, digest)


def import_image(paths: Paths, base: OciBase, report: Callable[[str], None]) -> None:
    """Unpack, add our mount point and DNS, pack as ext4, install as image `base.name`."""
    ident = identity(paths, base.image.digest)
    paths.images.mkdir(parents=True, exist_ok=True)
    _remove_stale_imports(paths.images)
    # beside the images (one filesystem: the rootfs is renamed into place, never copied)
    work = Path(tempfile.mkdtemp(prefix=f".import-{os.getpid()}-", dir=paths.images))
    try:
        report(
            f"importing {base.source} ({base.image.layers} layer(s), "
            f"{base.image.compressed_bytes / 2**20:.1f} MiB)"
        )
        rootfs = work / "rootfs"
        unpacked = oci.unpack(base.source, rootfs, work)
        prepare_root(rootfs)
        report(f"packing the root filesystem ({unpacked.unpacked_bytes / 2**20:.1f} MiB)")
        ext4 = work / "rootfs.ext4"
        oci.make_ext4(rootfs, ext4)
        shutil.rmtree(rootfs)
        try:
            ImageBuilder(paths, base.name).install_derived(BASE_IMAGE, ext4, ident)
        except ImageBuildError as exc:
            raise oci.OciError(f"installing the imported image failed: {exc}") from None
    except OSError as exc:
        raise oci.OciError(f"importing {base.source} failed: {exc}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _remove_stale_imports(images: Path) -> None:
    """Work dirs of imports whose process is gone (killed mid-import)."""
    for stale in images.glob(".import-*"):
        pid = stale.name.split("-")[1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)


def prepare_root(root: Path) -> None:
    """Our three additions, never through a link the image put there."""
    _real_dir(root, ".wrenn", empty=True)
    etc = _real_dir(root, "etc")
    _replace_file(etc, "resolv.conf", f"nameserver {GUEST_DNS}\n")
    if not (etc / "hostname").exists():
        _replace_file(etc, "hostname", f"{HOSTNAME}\n")
    for name in ("tmp", "root", "proc", "sys", "dev", "run"):
        _real_dir(root, name)


def _real_dir(parent: Path, name: str, empty: bool = False) -> Path:
    """parent/name as a real directory: whatever else is there under that name (a symlink,
    a file; with `empty`, anything) is removed first."""
    path = parent / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISDIR(st.st_mode) or empty):
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
        st = None
    if st is None:
        path.mkdir(mode=0o755)
    return path


def _replace_file(directory: Path, name: str, text: str) -> None:
    path = directory / name
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()  # a symlink is removed, never followed
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
