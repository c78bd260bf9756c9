"""Container images as files: the importer behind `FROM oci:<path>`.

A source is one of (told apart by content, never by file name):
- an OCI image layout directory: `oci-layout`, `index.json`, `blobs/sha256/...`;
- an OCI archive: a tar of such a layout (`skopeo copy ... oci-archive:`, `podman save
  --format oci-archive`, `docker save` since Docker 25, which also carries manifest.json);
- a classic `docker save` tarball: `manifest.json`, the config JSON and one tar per layer
  (docker, `podman save --format docker-archive`); a gzipped tarball (`docker save | gzip`)
  is read too.

`inspect()` reads only the index, manifest and config (no layer is read); `unpack()` applies
every layer into a root filesystem; `make_ext4()` packs that tree with `mkfs.ext4 -d` (no loop
mount, no daemon); `import_ext4()` does both and removes the tree.

Which tools, and why (each checked by running it here, umoci 0.4.7 and skopeo 1.9 from Debian
bookworm):
- umoci (`umoci raw unpack`) applies the layers: whiteouts (`.wh.<name>`), opaque directories
  (`.wh..wh..opq`), hardlinks to lower layers, ownership, modes and xattrs, and it resolves every
  path inside the rootfs (filepath-securejoin): a layer that writes through a symlink such as
  `evil -> /etc` lands in `<rootfs>/etc`, never in the host's /etc. Python's tarfile would
  follow such a symlink out of the tree, so applying layers in Python would mean re-writing that
  resolution. umoci needs a tag to pick the image (`tag is not found: latest` without one) and
  reads neither zstd layers nor docker-save tarballs, so it always reads a small layout this
  module writes in the work dir: the verified blobs, a manifest naming them, an index with one
  tag.
- Python (tarfile, gzip, hashlib) does what no tool here does before anything is written:
  every blob's sha256 against its descriptor, every layer's uncompressed sha256 against the
  config's diff_ids, the JSON documents' types and sizes, and every tar member (no absolute
  name, no `..`, no symlink whose relative target climbs out of the root, no hardlink to a path
  that no earlier entry made, a cap on the unpacked size). The classic docker-save tarball is
  read here too: its config's digest plus the diff_ids of its uncompressed layers give a manifest
  whose digest `inspect()` can compute without reading a layer. skopeo converts such a tarball
  (`skopeo copy docker-archive: oci:`) but re-compresses every layer with gzip on the way (CPU
  time, and a manifest digest known only after the conversion), so it is not in this path; it
  is installed for people who fetch images into files (`skopeo copy docker://debian:bookworm
  oci-archive:debian.tar`) and the tests use it to check that our archives are the ones the
  tools write.
- An OCI archive is read in place with tarfile: only the blobs the chosen manifest names are
  copied (digest-checked) into the work dir; skopeo's `oci-archive:` transport would first
  extract the whole archive to a temp dir.
- zstd layers (`tar+zstd`) are decompressed with the `zstd` tool into the work dir, since
  neither Python 3.11 nor umoci 0.4.7 reads them.

A failed unpack leaves nothing: the rootfs is emptied (removed if this call created it) and the
scratch dir under `work` is removed; nothing is written anywhere else (umoci's TMPDIR is the
scratch dir). The tree unpack() leaves holds the image's own symlinks, absolute ones such as
`etc/resolv.conf -> /run/...` included: host code that writes into it must not follow them.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, cast

from backend.recipes.parser import RecipeError

MAX_UNPACKED_BYTES = 16 << 30
"""The most an image may unpack to (sum of its layers' file sizes)."""
MAX_JSON_BYTES = 4 << 20
"""The largest index, manifest or config document read."""
MAX_LAYERS = 500
MAX_TRAILING_BYTES = 64 << 20
"""What a layer may carry after its tar's end (padding)."""
ARCH = "amd64"
TAG = "wrenn"

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)
INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20
ALLOWED_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "directory",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "device",
    tarfile.BLKTYPE: "device",
    tarfile.FIFOTYPE: "fifo",
}


class OciError(RecipeError):
    """The image cannot be imported: a message for the person, nothing half-made left."""


@dataclass(frozen=True)
class OciConfig:
    """What carries over from the image's config."""

    env: dict[str, str]
    workdir: str
    user: str
    cmd: list[str]
    entrypoint: list[str]

    @property
    def argv(self) -> list[str]:
        """What the image runs (Docker's rule: ENTRYPOINT, then CMD as its arguments)."""
        return [*self.entrypoint, *self.cmd]


@dataclass(frozen=True)
class OciImage:
    digest: str
    """The manifest's sha256 digest: the image's content identity (for a classic docker-save
    tarball, the digest of the OCI manifest its config and layers make, see _DockerSave)."""
    config: OciConfig
    layers: int
    compressed_bytes: int
    """The layer blobs as stored (a docker-save tarball's layers are plain tars)."""
    unpacked_bytes: int
    """The size of every file in every layer (0 from inspect(): only unpack() reads layers)."""


# -- reading the source --------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    index: int
    count: int
    digest: str
    """The blob's digest as the manifest states it."""
    size: int
    diff_id: str
    """sha256 of the uncompressed tar (config.rootfs.diff_ids)."""
    blob_is_diff: bool = False
    """docker-save: the blob is only known by its uncompressed digest."""

    @property
    def name(self) -> str:
        return f"layer {self.index + 1} of {self.count} ({_short(self.digest)})"


def _short(digest: str) -> str:
    return digest[:19]


class _Store:
    """Blobs by digest, from a layout dir or an archive."""

    what: str

    def index_bytes(self) -> bytes:
        raise NotImplementedError

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[IO[bytes]]:
        raise NotImplementedError
        yield  # pragma: no cover


class _LayoutDir(_Store):
    def __init__(self, root: Path) -> None:
        self.root = root
        self.what = f"the OCI layout {root}"

    def index_bytes(self) -> bytes:
        return _read_capped_file(self.root / "index.json", "index.json")

    def _path(self, digest: str) -> Path:
        match = DIGEST.fullmatch(digest)
        if match is None:
            raise OciError(f"{self.what}: unsupported digest {digest!r} (only sha256)")
        path = self.root / "blobs" / "sha256" / match.group(1)
        if not path.is_file():
            raise OciError(f"{self.what}: blob {_short(digest)} is missing")
        return path

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[IO[bytes]]:
        with self._path(digest).open("rb") as f:
            yield f


class _Archive(_Store):
    """An OCI archive: the layout's files as tar members."""

    def __init__(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], path: Path):
        self.tar = tar
        self.members = members
        self.what = f"the OCI archive {path}"

    def index_bytes(self) -> bytes:
        return _read_capped(self.member("index.json"), "index.json")

    def member(self, name: str) -> IO[bytes]:
        info = self.members.get(name)
        f = self.tar.extractfile(info) if info is not None else None
        if f is None:
            raise OciError(f"{self.what}: {name} is missing")
        return f

    def _name(self, digest: str) -> str:
        match = DIGEST.fullmatch(digest)
        if match is None:
            raise OciError(f"{self.what}: unsupported digest {digest!r} (only sha256)")
        name = f"blobs/sha256/{match.group(1)}"
        if name not in self.members:
            raise OciError(f"{self.what}: blob {_short(digest)} is missing")
        return name

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[IO[bytes]]:
        yield self.member(self._name(digest))


class _DockerSave(_Store):
    """A classic `docker save` tarball seen as an OCI layout: its config is a blob, each
    layer a plain-tar blob known by its diff_id, and a manifest made from them (deterministic,
    so the same tarball always gives the same digest)."""

    def __init__(self, tar: tarfile.TarFile, members: dict[str, tarfile.TarInfo], path: Path):
        self.tar = tar
        self.members = members
        self.what = f"the docker-save tarball {path}"
        self.blobs: dict[str, bytes] = {}
        self.layer_names: dict[str, str] = {}
        self.manifest_digest = self._synthesize()

    def member(self, name: str) -> IO[bytes]:
        info = self.members.get(_norm_member(name))
        f = self.tar.extractfile(info) if info is not None else None
        if f is None:
            raise OciError(f"{self.what}: {name} is missing")
        return f

    def _synthesize(self) -> str:
        entries = _parse_json(_read_capped(self.member("manifest.json"), "manifest.json"), "")
        if not isinstance(entries, list) or not entries:
            raise OciError(f"{self.what}: manifest.json is not a non-empty list")
        if len(entries) > 1:
            tags = [e.get("RepoTags") for e in entries if isinstance(e, dict)]
            raise OciError(
                f"{self.what} holds {len(entries)} images ({tags}); save one image per file"
            )
        entry = _expect(entries[0], dict, "manifest.json's entry")
        config_name = _expect(entry.get("Config"), str, "manifest.json Config")
        layer_names = _expect(entry.get("Layers"), list, "manifest.json Layers")
        config_bytes = _read_capped(self.member(config_name), config_name)
        config = _parse_json(config_bytes, config_name)
        diff_ids = _diff_ids(config, len(layer_names))
        config_digest = _digest(config_bytes)
        self.blobs[config_digest] = config_bytes
        layers = []
        for name, diff_id in zip(layer_names, diff_ids, strict=True):
            name = _expect(name, str, "manifest.json Layers[]")
            info = self.members.get(_norm_member(name))
            if info is None:
                raise OciError(f"{self.what}: layer {name} is missing")
            self.layer_names[diff_id] = _norm_member(name)
            layers.append({"mediaType": LAYER_TAR, "digest": diff_id, "size": info.size})
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPES[0],
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": config_digest,
                "size": len(config_bytes),
            },
            "layers": layers,
        }
        data = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
        digest = _digest(data)
        self.blobs[digest] = data
        return digest

    def index_bytes(self) -> bytes:
        size = len(self.blobs[self.manifest_digest])
        desc = {"mediaType": MANIFEST_TYPES[0], "digest": self.manifest_digest, "size": size}
        return json.dumps({"schemaVersion": 2, "manifests": [desc]}).encode()

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[IO[bytes]]:
        if digest in self.blobs:
            yield io.BytesIO(self.blobs[digest])
        elif digest in self.layer_names:
            yield self.member(self.layer_names[digest])
        else:
            raise OciError(f"{self.what}: blob {_short(digest)} is missing")


def _norm_member(name: str) -> str:
    return name.removeprefix("./").lstrip("/")


def _archive_members(infos: list[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    """The archive's regular files by normalized name; a symlink to one of them (docker save
    links a layer that occurs twice) is an alias. Nothing is extracted to disk."""
    members = {_norm_member(m.name): m for m in infos if m.isfile()}
    for info in infos:
        if info.issym() and not info.linkname.startswith("/"):
            parent = PurePosixPath(_norm_member(info.name)).parent
            parts: list[str] = []
            for part in (*parent.parts, *info.linkname.split("/")):
                if part == "..":
                    if not parts:
                        break
                    parts.pop()
                elif part not in ("", "."):
                    parts.append(part)
            else:
                target = members.get("/".join(parts))
                if target is not None:
                    members.setdefault(_norm_member(info.name), target)
    return members


@contextlib.contextmanager
def _open_store(source: Path) -> Iterator[_Store]:
    if source.is_dir():
        if not (source / "oci-layout").is_file() or not (source / "index.json").is_file():
            raise OciError(
                f"{source} is a directory but not an OCI image layout "
                "(no oci-layout or index.json file)"
            )
        yield _LayoutDir(source)
        return
    if not source.exists():
        raise OciError(f"{source}: no such file or directory")
    try:
        tar = tarfile.open(source, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise OciError(
            f"{source} is neither an OCI layout directory nor a tar archive of an image"
        ) from exc
    with tar:
        try:
            members = _archive_members(tar.getmembers())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
            raise OciError(f"{source}: the archive is corrupt or truncated ({exc})") from exc
        if "oci-layout" in members and "index.json" in members:
            yield _Archive(tar, members, source)
        elif "manifest.json" in members:
            yield _DockerSave(tar, members, source)
        else:
            raise OciError(
                f"{source} is a tar archive but not an image: it has neither index.json "
                "(OCI archive) nor manifest.json (docker save)"
            )


# -- documents -----------------------------------------------------------------------------


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _read_capped(f: IO[bytes], what: str) -> bytes:
    data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise OciError(f"{what} is larger than {MAX_JSON_BYTES >> 20} MiB")
    return data


def _read_capped_file(path: Path, what: str) -> bytes:
    with path.open("rb") as f:
        return _read_capped(f, what)


def _parse_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OciError(f"{what or 'manifest.json'} is not valid JSON ({exc})") from exc


def _expect(value: Any, kind: type, what: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise OciError(f"{what} should be a {kind.__name__}, not {type(value).__name__}")
    return value


def _read_blob(store: _Store, desc: Any, what: str) -> tuple[str, bytes]:
    """A small blob (manifest, config, index) read whole, its digest and size checked."""
    desc = _expect(desc, dict, f"the {what}'s descriptor")
    digest = _expect(desc.get("digest"), str, f"the {what}'s digest")
    size = _expect(desc.get("size"), int, f"the {what}'s size")
    if size > MAX_JSON_BYTES:
        raise OciError(f"{store.what}: the {what} claims {size} bytes, over the limit")
    with store.blob(digest) as f:
        data = _read_capped(f, f"the {what}")
    if _digest(data) != digest:
        raise OciError(f"{store.what}: the {what} {_short(digest)} does not match its digest")
    if len(data) != size:
        raise OciError(f"{store.what}: the {what} is {len(data)} bytes, its descriptor says {size}")
    return digest, data


def _platform(desc: dict[str, Any]) -> str:
    platform = desc.get("platform")
    if not isinstance(platform, dict):
        return ""
    return f"{platform.get('os', '?')}/{platform.get('architecture', '?')}"


def _ref_name(desc: dict[str, Any]) -> str:
    annotations = desc.get("annotations")
    name = (
        annotations.get("org.opencontainers.image.ref.name")
        if isinstance(annotations, dict)
        else None
    )
    return str(name) if name else _short(str(desc.get("digest")))


def _is_attestation(desc: dict[str, Any]) -> bool:
    annotations = desc.get("annotations")
    return (
        isinstance(annotations, dict)
        and annotations.get("vnd.docker.reference.type") == "attestation-manifest"
    ) or _platform(desc) == "unknown/unknown"


def _pick_manifest(store: _Store, index: Any, depth: int = 0) -> tuple[str, dict[str, Any]]:
    """(digest, manifest) of the linux/amd64 image of an index (or its only image)."""
    index = _expect(index, dict, "index.json")
    manifests = _expect(index.get("manifests"), list, "index.json manifests")
    candidates = [_expect(m, dict, "an index entry") for m in manifests]
    candidates = [m for m in candidates if not _is_attestation(m)]
    if not candidates:
        raise OciError(f"{store.what}: the index lists no image")
    if len(candidates) > 1:
        amd64 = [m for m in candidates if _platform(m) == f"linux/{ARCH}"]
        if not any(_platform(m) for m in candidates):
            tags = [_ref_name(m) for m in candidates]
            raise OciError(
                f"{store.what} has {len(candidates)} images ({', '.join(tags)}) and says "
                "nothing of their platforms; save one image per file"
            )
        if not amd64:
            found = ", ".join(sorted({_platform(m) or "unknown platform" for m in candidates}))
            raise OciError(
                f"{store.what} has {len(candidates)} images ({found}) and none for "
                f"linux/{ARCH}: capsules run linux/{ARCH}"
            )
        if len(amd64) > 1:
            raise OciError(
                f"{store.what} has {len(amd64)} linux/{ARCH} images; save one image per file"
            )
        candidates = amd64
    desc = candidates[0]
    digest, data = _read_blob(store, desc, "manifest")
    document = _expect(_parse_json(data, "the manifest"), dict, "the manifest")
    media_type = document.get("mediaType", desc.get("mediaType"))
    if media_type in INDEX_TYPES or "manifests" in document:
        if depth > 1:
            raise OciError(f"{store.what}: indexes nested too deep")
        return _pick_manifest(store, document, depth + 1)
    if media_type is not None and media_type not in MANIFEST_TYPES:
        raise OciError(f"{store.what}: unsupported manifest type {media_type!r}")
    return digest, document


def _diff_ids(config: Any, layers: int) -> list[str]:
    config = _expect(config, dict, "the image config")
    rootfs = _expect(config.get("rootfs"), dict, "the config's rootfs")
    diff_ids = _expect(rootfs.get("diff_ids"), list, "the config's rootfs.diff_ids")
    for d in diff_ids:
        if not isinstance(d, str) or DIGEST.fullmatch(d) is None:
            raise OciError(f"the config's diff_id {d!r} is not a sha256 digest")
    if len(diff_ids) != layers:
        raise OciError(f"the config lists {len(diff_ids)} diff_ids for {layers} layers")
    return list(diff_ids)


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    value = _expect(value, list, what)
    for item in value:
        _expect(item, str, f"an item of {what}")
    return list(value)


def _oci_config(config: dict[str, Any]) -> OciConfig:
    if config.get("architecture") not in (None, "", ARCH):
        raise OciError(
            f"the image is for {config.get('os', 'linux')}/{config['architecture']}: "
            f"capsules run linux/{ARCH}"
        )
    inner = config.get("config") or {}
    inner = _expect(inner, dict, "the config's config")
    env: dict[str, str] = {}
    for item in _str_list(inner.get("Env"), "Env"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OciError(f"the config's Env entry {item!r} is not KEY=VALUE")
        env[key] = value
    return OciConfig(
        env=env,
        workdir=_expect(inner.get("WorkingDir") or "", str, "WorkingDir"),
        user=_expect(inner.get("User") or "", str, "User"),
        cmd=_str_list(inner.get("Cmd"), "Cmd"),
        entrypoint=_str_list(inner.get("Entrypoint"), "Entrypoint"),
    )


@dataclass(frozen=True)
class _Image:
    digest: str
    config_digest: str
    config_bytes: bytes
    config: OciConfig
    layers: list[_Layer]


def _load(store: _Store) -> _Image:
    index = _parse_json(_index_bytes(store), "index.json")
    digest, manifest = _pick_manifest(store, index)
    config_digest, config_bytes = _read_blob(store, manifest.get("config"), "config")
    config_doc = _expect(_parse_json(config_bytes, "the config"), dict, "the config")
    descs = _expect(manifest.get("layers"), list, "the manifest's layers")
    if len(descs) > MAX_LAYERS:
        raise OciError(f"{store.what}: {len(descs)} layers, more than {MAX_LAYERS}")
    diff_ids = _diff_ids(config_doc, len(descs))
    layers = []
    for i, (desc, diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        desc = _expect(desc, dict, "a layer descriptor")
        layer_digest = _expect(desc.get("digest"), str, "a layer's digest")
        if DIGEST.fullmatch(layer_digest) is None:
            raise OciError(f"{store.what}: layer digest {layer_digest!r} is not sha256")
        size = _expect(desc.get("size"), int, "a layer's size")
        layers.append(
            _Layer(
                i,
                len(descs),
                layer_digest,
                size,
                diff_id,
                blob_is_diff=isinstance(store, _DockerSave),
            )
        )
    return _Image(digest, config_digest, config_bytes, _oci_config(config_doc), layers)


def _index_bytes(store: _Store) -> bytes:
    try:
        return store.index_bytes()
    except OSError as exc:
        raise OciError(f"{store.what}: cannot read index.json ({exc})") from exc


def _wrap_errors(source: Path) -> contextlib.AbstractContextManager[None]:
    return _ErrorContext(source)


class _ErrorContext(contextlib.AbstractContextManager[None]):
    """Turns the read errors an archive can raise anywhere into an OciError naming it."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if isinstance(exc, tarfile.TarError | EOFError | zlib.error | gzip.BadGzipFile):
            raise OciError(f"{self.source}: the archive is corrupt or truncated ({exc})") from exc
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OciError(f"the disk is full while importing {self.source}") from exc
        if isinstance(exc, OSError) and not isinstance(exc, OciError):
            raise OciError(f"{self.source}: {exc}") from exc


def inspect(source: Path) -> OciImage:
    """The image's identity and config, without reading a layer; raises OciError."""
    with _wrap_errors(source), _open_store(source) as store:
        image = _load(store)
        compressed = sum(layer.size for layer in image.layers)
    return OciImage(image.digest, image.config, len(image.layers), compressed, 0)


# -- checking and applying layers ----------------------------------------------------------


class _Counting(io.RawIOBase):
    """A read-through stream that hashes and counts what passes, and stops past a limit."""

    def __init__(self, inner: IO[bytes], limit: int, on_limit: Callable[[], OciError]) -> None:
        self.inner = inner
        self.hash = hashlib.sha256()
        self.count = 0
        self.limit = limit
        self.on_limit = on_limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.hash.update(data)
        self.count += n
        if self.count > self.limit:
            raise self.on_limit()
        return n

    @property
    def digest(self) -> str:
        return "sha256:" + self.hash.hexdigest()


class _Tree:
    """Which paths the layers so far leave, to check hardlink targets. Whiteouts and opaque
    markers hide what lower layers made (the OCI rule), recorded per layer so that each costs
    O(1) and a lookup O(depth)."""

    def __init__(self) -> None:
        self.added: dict[str, tuple[int, str]] = {}
        """path -> (the last layer that wrote it, its kind)"""
        self.whiteouts: dict[str, int] = {}
        """path -> the last layer that whited it (and its subtree) out"""
        self.opaque: dict[str, int] = {}
        """directory -> the last layer that hid its lower-layer contents"""

    def add(self, path: str, layer: int, kind: str) -> None:
        self.added[path] = (layer, kind)

    def kind(self, path: str) -> str | None:
        """The kind of what is at `path` now, None if nothing is."""
        entry = self.added.get(path)
        if entry is None:
            return None
        layer, kind = entry
        parts = path.split("/")
        for depth in range(len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if depth and self.whiteouts.get(prefix, -1) > layer:
                return None
            if depth < len(parts) and self.opaque.get(prefix, -1) > layer:
                return None
        return kind


def _clean_path(name: str, layer: _Layer, what: str = "entry") -> str:
    """A member name as a path relative to the root; refuses absolute names and `..`."""
    if name.startswith("/"):
        raise OciError(f"{layer.name}: {what} {name!r} is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise OciError(f"{layer.name}: {what} {name!r} climbs out of the root with '..'")
    if "\0" in name:
        raise OciError(f"{layer.name}: {what} {name!r} contains a NUL byte")
    return "/".join(parts)


def _symlink_escapes(path: str, target: str) -> bool:
    """True when a relative symlink target, resolved from the link's directory, leaves the
    root (absolute targets resolve inside the guest's root and are fine)."""
    if target.startswith("/"):
        return False
    depth = len(PurePosixPath(path).parent.parts)
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _check_member(member: tarfile.TarInfo, layer: _Layer, tree: _Tree) -> int:
    """Refuses a dangerous member; returns the bytes it adds to the rootfs."""
    kind = ALLOWED_TYPES.get(member.type)
    if kind is None:
        raise OciError(f"{layer.name}: entry {member.name!r} has an unsupported tar type")
    if member.name in ("", ".", "./"):
        return 0
    path = _clean_path(member.name, layer)
    base = PurePosixPath(path).name
    parent = str(PurePosixPath(path).parent)
    parent = "" if parent == "." else parent
    if base == ".wh..wh..opq":
        tree.opaque[parent] = layer.index
        return 0
    if base.startswith(".wh."):
        if base in (".wh.", ".wh..", ".wh..."):
            raise OciError(f"{layer.name}: whiteout {member.name!r} names no file")
        hidden = PurePosixPath(parent) / base.removeprefix(".wh.")
        tree.whiteouts[str(hidden).removeprefix("./")] = layer.index
        return 0
    if kind == "symlink":
        if _symlink_escapes(path, member.linkname):
            raise OciError(
                f"{layer.name}: symlink {member.name!r} -> {member.linkname!r} points outside "
                "the root filesystem"
            )
    elif kind == "hardlink":
        target = _clean_path(member.linkname, layer, "hardlink target")
        if tree.kind(target) not in ("file", "device", "fifo", "hardlink"):
            raise OciError(
                f"{layer.name}: hardlink {member.name!r} -> {member.linkname!r} names no file "
                "an earlier entry made"
            )
    tree.add(path, layer.index, kind)
    return member.size if kind == "file" else 0


@contextlib.contextmanager
def _decompressed(blob: Path, layer: _Layer) -> Iterator[tuple[IO[bytes], str]]:
    """The layer's tar stream and the media type umoci reads it as."""
    with blob.open("rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic.startswith(GZIP_MAGIC):
            with gzip.GzipFile(fileobj=f, mode="rb") as gz:
                yield cast(IO[bytes], gz), LAYER_GZIP
        elif magic == ZSTD_MAGIC:
            with _zstd(blob, layer).open("rb") as tar:
                yield tar, LAYER_TAR
        else:
            yield f, LAYER_TAR


def _zstd(blob: Path, layer: _Layer) -> Path:
    """The zstd blob decompressed beside it (the blob itself removed)."""
    if shutil.which("zstd") is None:
        raise OciError(f"{layer.name} is zstd-compressed and zstd is not installed (`make setup`)")
    out = blob.with_name(blob.name + ".tar")
    with out.open("wb") as dest:
        proc = subprocess.run(
            ["zstd", "-q", "-d", "-c", str(blob)], stdout=dest, stderr=subprocess.PIPE, check=False
        )
    if proc.returncode != 0:
        msg = proc.stderr.decode(errors="replace").strip()
        raise OciError(f"{layer.name} is not a valid zstd stream ({msg})")
    blob.unlink()
    return out


@dataclass(frozen=True)
class _Checked:
    digest: str
    media_type: str
    size: int
    unpacked: int


def _fetch_and_check(
    store: _Store, layer: _Layer, blobs: Path, tree: _Tree, budget: int
) -> _Checked:
    """Copies the layer's blob into `blobs` (checking its digest), then reads its tar
    through (checking its diff_id and every member). Returns what the work manifest lists."""
    tmp = blobs / f"incoming-{layer.index}"
    raw_hash = hashlib.sha256()
    if layer.size > MAX_UNPACKED_BYTES:
        raise OciError(f"{layer.name}: {layer.size} bytes, over the limit")
    with store.blob(layer.digest) as src, tmp.open("wb") as dest:
        size = 0
        while chunk := src.read(CHUNK):
            raw_hash.update(chunk)
            dest.write(chunk)
            size += len(chunk)
            if size > layer.size:
                raise OciError(f"{layer.name}: the blob is larger than its descriptor says")
    raw_digest = "sha256:" + raw_hash.hexdigest()
    if layer.blob_is_diff:
        pass  # checked below, against the diff_id: a docker layer may be gzipped
    elif raw_digest != layer.digest:
        raise OciError(f"{layer.name}: the blob does not match its digest (got {raw_digest})")
    elif size != layer.size:
        raise OciError(f"{layer.name}: the blob is {size} bytes, its descriptor says {layer.size}")

    def too_big() -> OciError:
        return OciError(
            f"{layer.name}: the image unpacks to more than {MAX_UNPACKED_BYTES >> 20} MiB"
        )

    unpacked = 0
    try:
        with _decompressed(tmp, layer) as (stream, media_type):
            counting = _Counting(stream, budget + MAX_TRAILING_BYTES, too_big)
            reader = io.BufferedReader(counting, CHUNK)
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    unpacked += _check_member(member, layer, tree)
                    if unpacked > budget:
                        raise too_big()
            # the rest: tar's end blocks and padding, then gzip's trailer and CRC check
            counting.limit = min(counting.limit, counting.count + MAX_TRAILING_BYTES)
            counting.on_limit = lambda: OciError(
                f"{layer.name}: more than {MAX_TRAILING_BYTES} bytes follow the end of its tar"
            )
            while reader.read(CHUNK):
                pass
    except OciError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise OciError(
            f"{layer.name} is corrupt or truncated ({exc or type(exc).__name__})"
        ) from exc
    if counting.digest != layer.diff_id:
        raise OciError(
            f"{layer.name}: its uncompressed content does not match the config's diff_id "
            f"{_short(layer.diff_id)} (got {_short(counting.digest)})"
        )
    stored = tmp if tmp.exists() else tmp.with_name(tmp.name + ".tar")
    digest = raw_digest if media_type == LAYER_GZIP else counting.digest
    final = blobs / digest.removeprefix("sha256:")
    stored.replace(final)
    return _Checked(digest, media_type, final.stat().st_size, unpacked)


def _write_json_blob(blobs: Path, document: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(document).encode()
    digest = _digest(data)
    (blobs / digest.removeprefix("sha256:")).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def _run_umoci(layout: Path, rootfs: Path, tmp: Path) -> None:
    if shutil.which("umoci") is None:
        raise OciError("umoci is not installed: run `make setup`, or apt-get install umoci")
    argv = ["umoci", "raw", "unpack", "--image", f"{layout}:{TAG}", str(rootfs)]
    if os.geteuid() != 0:
        argv.insert(3, "--rootless")
    proc = subprocess.run(
        argv, env={**os.environ, "TMPDIR": str(tmp)}, capture_output=True, check=False
    )
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        if "no space left" in err.lower():
            raise OciError(f"the disk holding {rootfs} is full while unpacking the image")
        # umoci prints progress lines (a bullet) before its error lines (a cross)
        lines = [ln.strip(" ⨯•") for ln in err.splitlines() if "•" not in ln] or [err]
        why = "; ".join(ln for ln in lines if ln)[-800:]
        raise OciError(f"applying the layers failed (umoci exit {proc.returncode}): {why}")


def _empty(rootfs: Path, created: bool) -> None:
    if created:
        shutil.rmtree(rootfs, ignore_errors=True)
        return
    for child in list(rootfs.iterdir()) if rootfs.is_dir() else []:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def unpack(source: Path, rootfs: Path, work: Path) -> OciImage:
    """Checks every blob and layer of the image at `source`, then applies the layers in order
    into `rootfs` (an empty directory, made if missing). Scratch files live in a directory
    under `work`, removed at the end. On any error raises OciError and leaves `rootfs` empty
    (or absent, if this call made it)."""
    created = not rootfs.exists()
    if not created and (not rootfs.is_dir() or any(rootfs.iterdir())):
        raise OciError(f"{rootfs} must be an empty directory to unpack an image into")
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="oci-", dir=work))
    try:
        layout = scratch / "layout"
        blobs = layout / "blobs" / "sha256"
        blobs.mkdir(parents=True)
        with _wrap_errors(source), _open_store(source) as store:
            image = _load(store)
            tree = _Tree()
            checked: list[_Checked] = []
            budget = MAX_UNPACKED_BYTES
            for layer in image.layers:
                result = _fetch_and_check(store, layer, blobs, tree, budget)
                budget -= result.unpacked
                checked.append(result)
        (blobs / image.config_digest.removeprefix("sha256:")).write_bytes(image.config_bytes)
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPES[0],
            "config": {
                "mediaType": CONFIG_TYPE,
                "digest": image.config_digest,
                "size": len(image.config_bytes),
            },
            "layers": [
                {"mediaType": c.media_type, "digest": c.digest, "size": c.size} for c in checked
            ],
        }
        desc = {"mediaType": MANIFEST_TYPES[0], **_write_json_blob(blobs, manifest)}
        desc["annotations"] = {"org.opencontainers.image.ref.name": TAG}
        (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
        rootfs.mkdir(parents=True, exist_ok=True)
        _run_umoci(layout, rootfs, scratch)
    except BaseException as exc:
        _empty(rootfs, created)
        if isinstance(exc, OSError) and not isinstance(exc, OciError):
            raise OciError(f"importing {source} failed: {exc}") from exc
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    compressed = sum(layer.size for layer in image.layers)
    unpacked = sum(c.unpacked for c in checked)
    return OciImage(image.digest, image.config, len(image.layers), compressed, unpacked)


# -- packing -------------------------------------------------------------------------------


def _tree_usage(root: Path) -> tuple[int, int]:
    """(bytes the tree takes on disk, number of inodes)."""
    used, inodes = 0, 1
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            used += max(st.st_blocks * 512, 4096)
            inodes += 1
    return used, inodes


def make_ext4(rootfs: Path, dest: Path, extra_mib: int = 512) -> None:
    """Packs `rootfs` into a sparse ext4 image `dest` of its content's size plus `extra_mib`
    MiB free, with `mkfs.ext4 -d` (owners, modes, xattrs, symlinks, hardlinks kept; no loop
    mount). Written beside `dest` and renamed into place; raises OciError."""
    used, inodes = _tree_usage(rootfs)
    # ext4's own metadata (inode tables, journal) on top of the content
    size_mib = (used * 11 // 10 >> 20) + extra_mib + 64
    inode_count = inodes + inodes // 4 + extra_mib * 64 + 1024
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.unlink(missing_ok=True)
    argv = [
        "mkfs.ext4",
        "-q",
        "-F",
        "-L",
        "wrenn-root",
        "-N",
        str(inode_count),
        "-E",
        "root_owner=0:0",
        "-d",
        str(rootfs),
        str(tmp),
        f"{size_mib}M",
    ]
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    try:
        with tmp.open("wb") as f:
            f.truncate(size_mib << 20)
        proc = subprocess.run(
            argv, env={**os.environ, "PATH": path}, capture_output=True, check=False
        )
        if proc.returncode != 0:
            err = proc.stderr.decode(errors="replace").strip()
            if "no space left" in err.lower():
                raise OciError(f"the disk holding {dest} is full while writing the ext4 image")
            raise OciError(f"mkfs.ext4 failed (exit {proc.returncode}): {err[-800:]}")
        tmp.replace(dest)
    except FileNotFoundError as exc:
        raise OciError(
            "mkfs.ext4 not found: run `make setup`, or apt-get install e2fsprogs"
        ) from exc
    except OSError as exc:
        raise OciError(f"writing {dest} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def import_ext4(source: Path, dest: Path, work: Path, extra_mib: int = 512) -> OciImage:
    """unpack() into a scratch tree under `work`, make_ext4() it as `dest`, remove the tree:
    the whole import in one call. On error `dest` is not made and `work` is left as it was."""
    work.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="oci-root-", dir=work))
    try:
        image = unpack(source, scratch / "rootfs", scratch)
        make_ext4(scratch / "rootfs", dest, extra_mib)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return image
