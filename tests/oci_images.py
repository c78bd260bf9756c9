"""Container images written from Python descriptions, for tests and benchmarks (no network, no
docker): an OCI image layout directory, an OCI archive (a tar of such a layout, as
`skopeo copy ... oci-archive:` writes), or a `docker save` tarball (manifest.json + one
<id>/layer.tar per layer, as docker and podman write).

A layer is a list of entries (File, Dir, Symlink, Hardlink, Whiteout, Opaque, Raw) or, for
hostile tests, a ready-made blob (`Blob`). Everything is deterministic (fixed mtimes, gzip
with mtime 0): the same description gives the same digests.

    layers = [[Dir("etc"), File("etc/motd", b"hi\\n")], [Whiteout("etc/motd")]]
    digest = write_layout(tmp / "img", layers, ImageConfig(env={"A": "1"}))
    busybox_layout(tmp / "bb")            # /bin/busybox + applet links: no libc, no Python
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from backend.image.tools import elf_has_interpreter

MTIME = 1_700_000_000
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
BUSYBOX_APPLETS = (
    "sh", "ls", "cat", "echo", "mkdir", "rm", "cp", "mv", "ln", "ps", "sleep", "env", "id",
    "wc", "head", "grep", "sed", "true", "false", "uname", "mount", "chmod", "touch", "kill",
)  # fmt: skip


@dataclass(frozen=True)
class File:
    path: str
    content: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    xattrs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str
    """The path of an entry written earlier in the same layer (tar's rule)."""


@dataclass(frozen=True)
class Whiteout:
    """Deletes `path` from the layers below."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides everything the layers below had in the directory `path`."""

    path: str


@dataclass(frozen=True)
class Raw:
    """A tar member exactly as given (for hostile layers: absolute names, `..`, devices)."""

    name: str
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    content: bytes = b""
    mode: int = 0o644
    devmajor: int = 0
    devminor: int = 0


@dataclass(frozen=True)
class Blob:
    """A layer given as its blob bytes (for corrupt or truncated layers)."""

    data: bytes
    media_type: str = LAYER_TAR_GZIP
    diff_id: str = ""


Entry = File | Dir | Symlink | Hardlink | Whiteout | Opaque | Raw
Layer = list[Entry] | Blob


@dataclass(frozen=True)
class ImageConfig:
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    user: str = ""
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    architecture: str = "amd64"

    def document(self, diff_ids: list[str]) -> dict[str, Any]:
        config: dict[str, Any] = {}
        if self.env:
            config["Env"] = [f"{k}={v}" for k, v in self.env.items()]
        if self.workdir:
            config["WorkingDir"] = self.workdir
        if self.user:
            config["User"] = self.user
        if self.cmd:
            config["Cmd"] = self.cmd
        if self.entrypoint:
            config["Entrypoint"] = self.entrypoint
        return {
            "created": "2023-11-14T22:13:20Z",
            "architecture": self.architecture,
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(entries: list[Entry]) -> bytes:
    """The uncompressed tar of one layer."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info, data = _member(entry)
            info.mtime = MTIME
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _member(entry: Entry) -> tuple[tarfile.TarInfo, bytes | None]:
    match entry:
        case File(path, content, mode, uid, gid, xattrs):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.uid, info.gid = len(content), mode, uid, gid
            if xattrs:
                info.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in xattrs.items()}
            return info, content
        case Dir(path, mode, uid, gid):
            info = tarfile.TarInfo(path.rstrip("/") + "/")
            info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
            return info, None
        case Symlink(path, target):
            info = tarfile.TarInfo(path)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            return info, None
        case Hardlink(path, target):
            info = tarfile.TarInfo(path)
            info.type, info.linkname = tarfile.LNKTYPE, target
            return info, None
        case Whiteout(path):
            p = PurePosixPath(path)
            return tarfile.TarInfo(str(p.parent / f".wh.{p.name}")), b""
        case Opaque(path):
            return tarfile.TarInfo(str(PurePosixPath(path) / ".wh..wh..opq")), b""
        case Raw(name, type_, linkname, content, mode, devmajor, devminor):
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = type_, linkname, mode
            info.devmajor, info.devminor = devmajor, devminor
            info.size = len(content) if type_ == tarfile.REGTYPE else 0
            return info, content if type_ == tarfile.REGTYPE else None
    raise TypeError(entry)


def gzip_bytes(data: bytes, level: int = 6) -> bytes:
    return gzip.compress(data, compresslevel=level, mtime=0)


@dataclass(frozen=True)
class _Built:
    blob: bytes
    media_type: str
    diff_id: str


def _build_layer(layer: Layer, compress: bool) -> _Built:
    if isinstance(layer, Blob):
        return _Built(layer.data, layer.media_type, layer.diff_id or sha256(layer.data))
    tar = layer_tar(layer)
    if compress:
        return _Built(gzip_bytes(tar), LAYER_TAR_GZIP, sha256(tar))
    return _Built(tar, LAYER_TAR, sha256(tar))


def write_blob(layout: Path, data: bytes, media_type: str) -> dict[str, Any]:
    """Stores `data` under blobs/sha256/ and returns its descriptor."""
    digest = sha256(data)
    path = layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def write_json(layout: Path, document: Any, media_type: str) -> dict[str, Any]:
    return write_blob(layout, json.dumps(document, sort_keys=True).encode(), media_type)


def write_index(layout: Path, manifests: list[dict[str, Any]]) -> None:
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True))


def write_image(
    layout: Path,
    layers: list[Layer],
    config: ImageConfig | None = None,
    compress: bool = True,
) -> dict[str, Any]:
    """Stores one image's layers, config and manifest in `layout`; returns the manifest's
    descriptor (no index written: write_index does that)."""
    config = config or ImageConfig()
    built = [_build_layer(layer, compress) for layer in layers]
    layer_descs = [write_blob(layout, b.blob, b.media_type) for b in built]
    config_desc = write_json(layout, config.document([b.diff_id for b in built]), CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_desc,
        "layers": layer_descs,
    }
    desc = write_json(layout, manifest, MANIFEST)
    desc["platform"] = {"architecture": config.architecture, "os": "linux"}
    return desc


def write_layout(
    dest: Path,
    layers: list[Layer],
    config: ImageConfig | None = None,
    compress: bool = True,
    ref: str = "latest",
) -> str:
    """An OCI image layout directory with one image; returns the manifest digest."""
    desc = write_image(dest, layers, config, compress)
    if ref:
        desc["annotations"] = {"org.opencontainers.image.ref.name": ref}
    write_index(dest, [desc])
    return str(desc["digest"])


def _tar_dir(src: Path, dest: Path) -> None:
    with tarfile.open(dest, "w") as tar:
        for path in sorted(src.rglob("*")):
            info = tar.gettarinfo(str(path), str(path.relative_to(src)))
            info.mtime, info.uid, info.gid, info.uname, info.gname = MTIME, 0, 0, "", ""
            if path.is_file():
                with path.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


def write_oci_archive(
    dest: Path, layers: list[Layer], config: ImageConfig | None = None, compress: bool = True
) -> str:
    """An OCI archive (tar of a layout); returns the manifest digest."""
    staging = dest.with_name(dest.name + ".layout")
    digest = write_layout(staging, layers, config, compress)
    try:
        _tar_dir(staging, dest)
    finally:
        shutil.rmtree(staging)
    return digest


def write_docker_save(dest: Path, layers: list[Layer], config: ImageConfig | None = None) -> None:
    """A `docker save` tarball in docker's classic layout: manifest.json, <config sha>.json,
    <layer id>/layer.tar (uncompressed, as docker writes them)."""
    config = config or ImageConfig()
    tars = [layer.data if isinstance(layer, Blob) else layer_tar(layer) for layer in layers]
    config_bytes = json.dumps(config.document([sha256(t) for t in tars]), sort_keys=True).encode()
    config_name = f"{sha256(config_bytes).removeprefix('sha256:')}.json"
    staging = dest.with_name(dest.name + ".staging")
    staging.mkdir()
    try:
        names = []
        for i, tar in enumerate(tars):
            layer_id = hashlib.sha256(f"{i}:{sha256(tar)}".encode()).hexdigest()
            (staging / layer_id).mkdir()
            (staging / layer_id / "layer.tar").write_bytes(tar)
            (staging / layer_id / "VERSION").write_text("1.0")
            names.append(f"{layer_id}/layer.tar")
        (staging / config_name).write_bytes(config_bytes)
        manifest = [{"Config": config_name, "RepoTags": ["test:latest"], "Layers": names}]
        (staging / "manifest.json").write_text(json.dumps(manifest))
        _tar_dir(staging, dest)
    finally:
        shutil.rmtree(staging)


def busybox_layout(dest: Path, busybox: Path = Path("/bin/busybox")) -> str:
    """A 1-layer OCI layout with only a static busybox and its applet links, plus the empty
    directories a root filesystem needs: no Python, no libc. Returns the manifest digest."""
    if elf_has_interpreter(busybox):
        raise ValueError(f"{busybox} is dynamically linked: apt-get install busybox-static")
    layer: list[Entry] = [Dir("bin")]
    layer.append(File("bin/busybox", busybox.read_bytes(), mode=0o755))
    layer += [Symlink(f"bin/{applet}", "/bin/busybox") for applet in BUSYBOX_APPLETS]
    layer += [Dir(d) for d in ("etc", "root", "proc", "sys", "dev")]
    layer.append(Dir("tmp", mode=0o1777))
    config = ImageConfig(env={"PATH": "/bin"}, workdir="/", cmd=["/bin/sh"])
    return write_layout(dest, [layer], config)


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
