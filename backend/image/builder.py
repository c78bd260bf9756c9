"""Builds the default capsule image, one cached stage at a time, and installs it atomically.

Layout of an image dir (`<data>/images/<name>/`): vmlinux, initrd.cpio.gz, rootfs.ext4 (the
image's own root: nothing of the agent in it but an empty /.wrenn mount point), agent.ext4
(envd, its Python and PID 1: backend/image/agent.py), manifest.json. The manifest is written
last and the dir is renamed into place, so a dir with a manifest is always a complete image;
a failed build leaves only a `.build-*` dir, removed on the next build.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from backend.config import Paths, assets_dir
from backend.image import agent, initramfs, kernel, rootfs
from backend.image.errors import ImageBuildError
from backend.image.manifest import (
    IMAGE_FORMAT,
    MANIFEST_NAME,
    ImageFile,
    ImageManifest,
    load_manifest,
)
from backend.image.recipe import Recipe
from backend.image.tools import disk_full_error, find_static_busybox, is_disk_full, require_tools
from backend.sparse import sparse_checksum

BUILDER_VERSION = "2"
"""Bump when the builder's output changes for the same inputs."""
MIN_FREE_BYTES = 3 << 30
IMAGE_FILES = ("vmlinux", "initrd.cpio.gz", "rootfs.ext4", "agent.ext4")

BuildProgress = Callable[[str, float], None]
"""Called with (step description, overall fraction done 0..1)."""


@dataclass(frozen=True)
class ImageStatus:
    name: str
    path: Path
    manifest: ImageManifest | None
    up_to_date: bool

    @property
    def present(self) -> bool:
        return self.manifest is not None


def _hash_files(paths: list[Path], base: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(base)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def _short(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class ImageBuilder:
    """Builds and inspects the images of one data dir."""

    def __init__(self, paths: Paths, recipe_name: str = "default") -> None:
        self.paths = paths
        self.recipe_name = recipe_name
        self._backend_dir = Path(__file__).resolve().parent.parent
        self._guest_assets = assets_dir() / "guest"

    @property
    def image_dir(self) -> Path:
        return self.paths.image_dir(self.recipe_name)

    # -- inputs -----------------------------------------------------------------------------

    def envd_source_hash(self) -> str:
        envd = self._backend_dir / "envd"
        files = [
            p
            for p in envd.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
        ]
        files.append(self._backend_dir / "__init__.py")
        return _hash_files(files, self._backend_dir)

    def stage_keys(self, recipe: Recipe) -> dict[str, str]:
        guest = self._guest_assets
        requirements = (self._backend_dir / "envd" / "requirements.txt").read_text()
        base = _short(
            BUILDER_VERSION, recipe.suite, recipe.variant, *recipe.packages, f"user={recipe.user}"
        )
        return {
            "kernel": _short(BUILDER_VERSION, recipe.kernel_package),
            "initramfs": _short(
                BUILDER_VERSION,
                recipe.kernel_package,
                *recipe.stage1_modules,
                (guest / "stage1-init").read_text(),
            ),
            "base": base,
            "wheels": _short(BUILDER_VERSION, base, requirements),
            "agent": _short(
                BUILDER_VERSION,
                base,
                requirements,
                self.envd_source_hash(),
                (guest / "wrenn-init").read_text(),
            ),
            "rootfs": _short(BUILDER_VERSION, base, str(recipe.disk_size_mib)),
        }

    def input_key(self, recipe: Recipe) -> str:
        keys = self.stage_keys(recipe)
        return hashlib.sha256(
            (recipe.as_json() + json.dumps(keys, sort_keys=True)).encode()
        ).hexdigest()

    # -- status -----------------------------------------------------------------------------

    def installed(self) -> ImageManifest | None:
        """The installed image's manifest, without checking it against the current inputs
        (which hashes envd's sources): enough to know a capsule can be started."""
        return load_manifest(self.image_dir)

    def status(self) -> ImageStatus:
        manifest = load_manifest(self.image_dir)
        up_to_date = False
        if manifest is not None:
            recipe = Recipe.load(self.recipe_name)
            up_to_date = (
                manifest.format == IMAGE_FORMAT
                and manifest.input_key == self.input_key(recipe)
                and all(
                    (self.image_dir / f.name).is_file()
                    and (self.image_dir / f.name).stat().st_size == f.size
                    for f in manifest.files.values()
                )
            )
        return ImageStatus(self.recipe_name, self.image_dir, manifest, up_to_date)

    def list_images(self) -> list[ImageStatus]:
        if not self.paths.images.is_dir():
            return []
        names = sorted(
            p.name
            for p in self.paths.images.iterdir()
            if p.is_dir() and not p.name.startswith(".") and "@" not in p.name
        )
        result = []
        for name in names:
            manifest = load_manifest(self.paths.image_dir(name))
            if name == self.recipe_name:
                result.append(self.status())
            else:
                result.append(ImageStatus(name, self.paths.image_dir(name), manifest, False))
        return result

    # -- build ------------------------------------------------------------------------------

    def build(
        self, force: bool = False, progress: BuildProgress | None = None
    ) -> ImageManifest | None:
        """Build the image if any input changed (or `force`); None when it was already current."""
        report = progress or (lambda _step, _fraction: None)
        if not force:
            current = self.status()
            if current.up_to_date:
                return None
        started = time.monotonic()
        recipe = Recipe.load(self.recipe_name)
        require_tools()
        if os.geteuid() != 0:
            raise ImageBuildError(
                "building an image needs root (debootstrap, chroot, device files)",
                "run `sudo wrenn-tui image build`, or `make setup`",
            )
        self.paths.ensure()
        free = shutil.disk_usage(self.paths.data).free
        if free < MIN_FREE_BYTES:
            raise ImageBuildError(
                f"only {free >> 20} MiB free under {self.paths.data}",
                "the build needs about 3 GiB: free some space or set WRENN_DATA_DIR",
            )
        try:
            return self._build(recipe, force, report, started)
        except OSError as exc:
            if is_disk_full(exc):
                raise disk_full_error(self.paths.data) from exc
            raise ImageBuildError(f"image build failed: {exc}") from exc

    def _build(
        self, recipe: Recipe, force: bool, report: BuildProgress, started: float
    ) -> ImageManifest:
        keys = self.stage_keys(recipe)
        cache = self.paths.cache
        self._remove_stale_work_dirs()
        tag = f"{os.getpid()}"
        build_dir = self.paths.images / f".build-{self.recipe_name}-{tag}"
        build_dir.mkdir(parents=True)
        build_dir.chmod(0o700)
        try:
            report("kernel: Debian cloud kernel package", 0.02)
            kernel_dir = cache / "kernel" / keys["kernel"]
            kern = None if force else kernel.Kernel.load(kernel_dir)
            if kern is None:
                kern = kernel.fetch_kernel(
                    recipe.kernel_package, kernel_dir, cache / f".work-kernel-{tag}"
                )
            shutil.copy2(kern.vmlinux, build_dir / "vmlinux")

            report("initramfs: busybox + virtio modules", 0.10)
            initramfs.build_initramfs(
                kern,
                recipe.stage1_modules,
                find_static_busybox(),
                self._guest_assets / "stage1-init",
                build_dir / "initrd.cpio.gz",
                build_dir,
            )

            base_dir = cache / "base" / keys["base"]
            if force or not (base_dir / "rootfs" / "usr" / "bin" / "python3").exists():
                mirror = rootfs.debian_mirror(recipe.suite)
                report(f"rootfs: checking mirror {mirror}", 0.12)
                rootfs.check_mirror(mirror, recipe.suite)
                report(
                    f"rootfs: debootstrap {recipe.suite} ({recipe.variant}) — about a minute", 0.15
                )
                rootfs.build_base(
                    recipe.suite,
                    recipe.variant,
                    recipe.packages,
                    mirror,
                    recipe.user,
                    base_dir,
                    cache / f".work-base-{tag}",
                )
            base_rootfs = base_dir / "rootfs"
            python_version = rootfs.guest_python_version(base_rootfs)

            report("rootfs: envd's pinned wheels", 0.75)
            wheels_dir = cache / "wheels" / keys["wheels"]
            if force or not (wheels_dir / "site").is_dir():
                rootfs.install_wheels(
                    self._backend_dir / "envd" / "requirements.txt",
                    python_version,
                    wheels_dir,
                    cache / f".work-wheels-{tag}",
                )

            report("agent disk: envd, its Python and PID 1", 0.80)
            from backend.envd import __version__ as envd_version

            image_info = json.dumps(
                {
                    "name": self.recipe_name,
                    "input_key": self.input_key(recipe),
                    "envd_version": envd_version,
                },
                indent=2,
            )
            agent_tree = build_dir / "agent"
            agent.build_agent_tree(
                base_rootfs,
                python_version,
                wheels_dir / "site",
                self._backend_dir / "envd",
                self._backend_dir / "__init__.py",
                self._guest_assets / "wrenn-init",
                image_info,
                agent_tree,
            )
            agent.pack_agent(agent_tree, build_dir / "agent.ext4")
            shutil.rmtree(agent_tree)

            report("rootfs: packing ext4", 0.85)
            rootfs.pack(base_rootfs, recipe.disk_size_mib, build_dir / "rootfs.ext4", build_dir)

            report("manifest: checksums", 0.93)
            files = {}
            for name in IMAGE_FILES:
                st = (build_dir / name).stat()
                files[name] = ImageFile(
                    name=name,
                    size=st.st_size,
                    allocated=st.st_blocks * 512,
                    sha256=sparse_checksum(build_dir / name),
                )
            manifest = ImageManifest(
                name=self.recipe_name,
                format=IMAGE_FORMAT,
                input_key=self.input_key(recipe),
                built_at=time.time(),
                build_seconds=round(time.monotonic() - started, 2),
                kernel_package=kern.package,
                kernel_version=kern.version,
                kernel_release=kern.release,
                suite=recipe.suite,
                envd_version=envd_version,
                python_version=python_version,
                stage_keys=keys,
                files=files,
            )
            (build_dir / MANIFEST_NAME).write_text(manifest.to_json())
            for name in (*IMAGE_FILES, MANIFEST_NAME):
                with (build_dir / name).open("rb") as f:
                    os.fsync(f.fileno())

            report("installing image", 0.98)
            self._install(build_dir, manifest.version)
            report("done", 1.0)
            return manifest
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise

    def install_derived(self, base: str, rootfs_ext4: Path, identity: str) -> ImageManifest:
        """Install image NAME (this builder's name) from a root filesystem made elsewhere (an
        OCI image's, backend/recipes/oci.py) with the kernel, initramfs and agent disk of the
        installed image `base` (hard links: stored once). `identity` names the rootfs's
        content (an OCI manifest digest); with the base's version it makes the input key, so
        the same rootfs on a newer base is a new version. `rootfs_ext4` is moved in."""
        source = ImageBuilder(self.paths, base)
        base_manifest = source.installed()
        if base_manifest is None or "agent.ext4" not in base_manifest.files:
            raise ImageBuildError(
                f"image {base!r} is not installed (or predates agent disks)",
                "run `wrenn-tui image build`",
            )
        base_dir = source.image_dir.resolve()
        input_key = hashlib.sha256(f"{base_manifest.input_key}\n{identity}".encode()).hexdigest()
        self._remove_stale_work_dirs()
        build_dir = self.paths.images / f".build-{self.recipe_name}-{os.getpid()}"
        build_dir.mkdir(parents=True)
        build_dir.chmod(0o700)
        started = time.monotonic()
        try:
            files = {}
            for name in IMAGE_FILES:
                if name == "rootfs.ext4":
                    shutil.move(rootfs_ext4, build_dir / name)
                    st = (build_dir / name).stat()
                    files[name] = ImageFile(
                        name, st.st_size, st.st_blocks * 512, sparse_checksum(build_dir / name)
                    )
                else:
                    os.link(base_dir / name, build_dir / name)
                    files[name] = base_manifest.files[name]
            manifest = replace(
                base_manifest,
                name=self.recipe_name,
                input_key=input_key,
                built_at=time.time(),
                build_seconds=round(time.monotonic() - started, 2),
                suite=identity,
                stage_keys={**base_manifest.stage_keys, "rootfs": identity},
                files=files,
                template_snapshots={},
            )
            (build_dir / MANIFEST_NAME).write_text(manifest.to_json())
            with (build_dir / MANIFEST_NAME).open("rb") as f:
                os.fsync(f.fileno())
            with (build_dir / "rootfs.ext4").open("rb") as f:
                os.fsync(f.fileno())
            self._install(build_dir, manifest.version)
            return manifest
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise

    def _install(self, build_dir: Path, version: str) -> None:
        """Move the new image to `<name>@<version>` and point the `<name>` link at it.

        Versions are kept side by side because capsules' disk overlays and snapshots refer to
        the exact rootfs and kernel they were made from; old versions are removed by
        `prune_versions` once nothing refers to them.
        """
        versioned = self.paths.images / f"{self.recipe_name}@{version}"
        if versioned.exists():
            shutil.rmtree(versioned)
        build_dir.rename(versioned)
        link = self.image_dir
        tmp_link = self.paths.images / f".link-{self.recipe_name}-{os.getpid()}"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(versioned.name)
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)  # an image dir from before versioned installs
        tmp_link.rename(link)

    def prune_versions(self, keep: set[Path]) -> list[Path]:
        """Remove image versions other than the current one and those in `keep`."""
        current = self.image_dir.resolve()
        removed = []
        for path in self.paths.images.glob(f"{self.recipe_name}@*"):
            if path.resolve() != current and path.resolve() not in keep:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        return removed

    def _remove_stale_work_dirs(self) -> None:
        for parent in (self.paths.images, self.paths.cache):
            if not parent.is_dir():
                continue
            for stale in parent.glob(".build-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in parent.glob(".work-*"):
                shutil.rmtree(stale, ignore_errors=True)
            for stale in parent.glob(".link-*"):
                stale.unlink(missing_ok=True)
