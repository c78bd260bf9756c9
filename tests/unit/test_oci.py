"""The OCI importer without VMs: the three source formats, layer semantics (whiteouts, opaque
dirs, hardlinks, ownership), the config that carries over, the digest, every hostile input
refused with nothing written outside the rootfs, and make_ext4's result read back by debugfs.
Images are written by tests/oci_images.py; umoci, skopeo, zstd and e2fsprogs are the real ones."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from backend.recipes import oci
from backend.recipes.oci import OciError, import_ext4, inspect, make_ext4, unpack
from backend.recipes.parser import RecipeError
from tests.oci_images import (
    BUSYBOX_APPLETS,
    CONFIG,
    MANIFEST,
    Blob,
    Dir,
    File,
    Hardlink,
    ImageConfig,
    Layer,
    Opaque,
    Raw,
    Symlink,
    Whiteout,
    busybox_layout,
    gzip_bytes,
    layer_tar,
    sha256,
    write_blob,
    write_docker_save,
    write_image,
    write_index,
    write_json,
    write_layout,
    write_oci_archive,
)

BASE: list[Layer] = [
    [
        Dir("etc"),
        File("etc/hostname", b"base\n"),
        File("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        Dir("opt"),
        File("opt/old", b"old"),
        Dir("opt/sub"),
        File("opt/sub/deep", b"deep"),
        Dir("usr/lib", mode=0o755),
        Symlink("lib", "usr/lib"),
        Dir("home/app", mode=0o700, uid=1000, gid=1000),
        File("home/app/.profile", b"export A=1\n", mode=0o600, uid=1000, gid=1000),
    ],
    [
        Whiteout("etc/hostname"),
        Opaque("opt"),
        File("opt/new", b"new"),
        Hardlink("opt/new-link", "opt/new"),
        File("bin/tool", b"#!/bin/sh\necho tool\n", mode=0o4755),
        Hardlink("bin/tool-link", "bin/tool"),
        Symlink("bin/abs", "/bin/tool"),
        File("usr/lib/libx.so", b"\x7fELF fake", xattrs={"user.origin": "layer2"}),
    ],
    [
        Whiteout("home/app"),
        File("etc/hostname", b"top\n"),
        Hardlink("etc/passwd-copy", "etc/passwd"),
        Dir("tmp", mode=0o1777),
    ],
]
CONFIG_FULL = ImageConfig(
    env={"PATH": "/usr/bin:/bin", "GREETING": "a=b c"},
    workdir="/srv/app",
    user="1000:1000",
    cmd=["--port", "8080"],
    entrypoint=["/bin/server"],
)


def snapshot(root: Path) -> dict[str, tuple[Any, ...]]:
    """Every path's type, mode, owner, content or target, and hardlink group."""
    out: dict[str, tuple[Any, ...]] = {}
    inodes: dict[int, str] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st.st_mode):
            detail: Any = os.readlink(path)
        elif stat.S_ISREG(st.st_mode):
            detail = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            detail = (detail, inodes.setdefault(st.st_ino, rel))
        else:
            detail = None
        out[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, detail)
    return out


@pytest.fixture
def area(tmp_path: Path) -> dict[str, Path]:
    """rootfs and work dirs with a canary file beside them that must never change."""
    canary = tmp_path / "canary.txt"
    canary.write_text("untouched")
    return {
        "tmp": tmp_path,
        "rootfs": tmp_path / "rootfs",
        "work": tmp_path / "work",
        "canary": canary,
        "escape": tmp_path / "escaped",
    }


def assert_nothing_left(area: dict[str, Path]) -> None:
    assert area["canary"].read_text() == "untouched"
    assert not area["escape"].exists()
    assert not area["rootfs"].exists() or not any(area["rootfs"].iterdir())
    assert not area["work"].exists() or not any(area["work"].iterdir())
    assert {p.name for p in area["tmp"].iterdir()} <= {
        "canary.txt",
        "rootfs",
        "work",
        "src",
        "src.tar",
    }


# -- formats and layer semantics -----------------------------------------------------------


def test_the_three_formats_give_the_same_rootfs(tmp_path: Path) -> None:
    write_layout(tmp_path / "layout", BASE, CONFIG_FULL)
    write_oci_archive(tmp_path / "archive.tar", BASE, CONFIG_FULL)
    write_docker_save(tmp_path / "docker.tar", BASE, CONFIG_FULL)
    trees = {}
    for name in ("layout", "archive.tar", "docker.tar"):
        image = unpack(tmp_path / name, tmp_path / f"root-{name}", tmp_path / "work")
        assert image.layers == 3 and image.config.entrypoint == ["/bin/server"]
        assert image.unpacked_bytes > 0
        trees[name] = snapshot(tmp_path / f"root-{name}")
    assert trees["layout"] == trees["archive.tar"] == trees["docker.tar"]
    assert not any((tmp_path / "work").iterdir())


def test_whiteouts_opaque_dirs_hardlinks_and_owners_across_three_layers(
    area: dict[str, Path],
) -> None:
    src = area["tmp"] / "src"
    write_layout(src, BASE)
    unpack(src, area["rootfs"], area["work"])
    tree = snapshot(area["rootfs"])
    root = area["rootfs"]
    # layer 2 whited out etc/hostname, layer 3 wrote it again
    assert (root / "etc/hostname").read_bytes() == b"top\n"
    # opaque opt: the lower layer's files are gone, the new one is there
    assert sorted(p.name for p in (root / "opt").iterdir()) == ["new", "new-link"]
    assert (root / "opt/new-link").stat().st_ino == (root / "opt/new").stat().st_ino
    # a whiteout of a directory removes its tree
    assert not (root / "home/app").exists() and (root / "home").is_dir()
    # hardlinks within a layer and to a lower layer's file
    assert (root / "bin/tool").stat().st_ino == (root / "bin/tool-link").stat().st_ino
    assert (root / "etc/passwd").stat().st_ino == (root / "etc/passwd-copy").stat().st_ino
    assert tree["bin/tool"][0] == "-rwsr-xr-x"
    assert os.readlink(root / "bin/abs") == "/bin/tool"
    assert os.readlink(root / "lib") == "usr/lib"
    assert tree["tmp"][0] == "drwxrwxrwt"
    assert os.getxattr(root / "usr/lib/libx.so", "user.origin") == b"layer2"


def test_owners_and_modes_are_the_images(area: dict[str, Path]) -> None:
    src = area["tmp"] / "src"
    write_layout(src, [BASE[0]])
    unpack(src, area["rootfs"], area["work"])
    tree = snapshot(area["rootfs"])
    assert tree["home/app"][:3] == ("drwx------", 1000, 1000)
    assert tree["home/app/.profile"][:3] == ("-rw-------", 1000, 1000)
    assert tree["etc/passwd"][:3] == ("-rw-r--r--", 0, 0)


def test_writing_through_an_absolute_symlink_stays_inside_the_rootfs(
    area: dict[str, Path],
) -> None:
    """A symlink to an absolute path is normal (`/bin/sh -> /bin/busybox`); a later layer
    that writes through it must land inside the rootfs, never on the host."""
    src = area["tmp"] / "src"
    outside = area["escape"]
    write_layout(src, [[Symlink("evil", str(outside))], [File("evil/pwned", b"x")]])
    unpack(src, area["rootfs"], area["work"])
    assert not outside.exists()
    assert (area["rootfs"] / str(outside).lstrip("/") / "pwned").read_bytes() == b"x"
    assert area["canary"].read_text() == "untouched"


def test_config_carries_over_and_inspect_reads_no_layer(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_layout(src, BASE, CONFIG_FULL)
    image = inspect(src)
    assert image.config.env == {"PATH": "/usr/bin:/bin", "GREETING": "a=b c"}
    assert image.config.workdir == "/srv/app"
    assert image.config.user == "1000:1000"
    assert image.config.cmd == ["--port", "8080"]
    assert image.config.entrypoint == ["/bin/server"]
    assert image.layers == 3 and image.compressed_bytes > 0
    # no layer is read: inspect still answers with every layer blob gone
    manifest = json.loads((src / "blobs/sha256" / image.digest[7:]).read_bytes())
    for layer in manifest["layers"]:
        (src / "blobs/sha256" / layer["digest"][7:]).unlink()
    assert inspect(src) == image
    # an image with no config at all gives empty values
    write_layout(tmp_path / "bare", [[File("a")]])
    bare = inspect(tmp_path / "bare").config
    assert (bare.env, bare.workdir, bare.user, bare.cmd, bare.entrypoint) == ({}, "", "", [], [])


def test_the_digest_is_stable_and_follows_the_content(tmp_path: Path) -> None:
    first = write_layout(tmp_path / "a", BASE, CONFIG_FULL)
    again = write_layout(tmp_path / "b", BASE, CONFIG_FULL)
    changed = [BASE[0], BASE[1], [*BASE[2], File("etc/extra", b"1")]]  # type: ignore[misc]
    other = write_layout(tmp_path / "c", changed, CONFIG_FULL)
    assert inspect(tmp_path / "a").digest == first == again == inspect(tmp_path / "b").digest
    assert inspect(tmp_path / "c").digest == other != first
    assert unpack(tmp_path / "a", tmp_path / "r", tmp_path / "w").digest == first
    # docker-save: the same tarball twice gives the same digest, a changed layer another
    write_docker_save(tmp_path / "d1.tar", BASE)
    write_docker_save(tmp_path / "d2.tar", BASE)
    write_docker_save(tmp_path / "d3.tar", changed)
    d1 = inspect(tmp_path / "d1.tar").digest
    assert d1 == inspect(tmp_path / "d2.tar").digest != inspect(tmp_path / "d3.tar").digest
    assert unpack(tmp_path / "d1.tar", tmp_path / "r2", tmp_path / "w").digest == d1


def test_docker_save_gzipped_and_with_a_linked_duplicate_layer(tmp_path: Path) -> None:
    """`docker save | gzip` is read as is; docker links a layer that occurs twice."""
    write_docker_save(tmp_path / "plain.tar", BASE)
    (tmp_path / "plain.tar.gz").write_bytes(gzip_bytes((tmp_path / "plain.tar").read_bytes()))
    a = unpack(tmp_path / "plain.tar.gz", tmp_path / "root-gz", tmp_path / "work")
    b = unpack(tmp_path / "plain.tar", tmp_path / "root", tmp_path / "work")
    assert a.digest == b.digest
    assert snapshot(tmp_path / "root-gz") == snapshot(tmp_path / "root")

    twice: list[Layer] = [[File("a", b"1")], [File("b", b"2")], [File("a", b"1")]]
    write_docker_save(tmp_path / "twice.tar", twice)
    with tarfile.open(tmp_path / "twice.tar") as tar:
        infos = tar.getmembers()
        data = {m.name: tar.extractfile(m).read() for m in infos if m.isfile()}  # type: ignore[union-attr]
    manifest = json.loads(data["manifest.json"])
    first, _, third = manifest[0]["Layers"]
    with tarfile.open(tmp_path / "linked.tar", "w") as tar:
        for info in infos:
            if info.name == third:
                link = tarfile.TarInfo(third)
                link.type, link.linkname = tarfile.SYMTYPE, f"../{first}"
                tar.addfile(link)
            elif info.isfile():
                tar.addfile(info, io.BytesIO(data[info.name]))
            else:
                tar.addfile(info)
    unpack(tmp_path / "linked.tar", tmp_path / "root-linked", tmp_path / "work")
    assert sorted(p.name for p in (tmp_path / "root-linked").iterdir()) == ["a", "b"]


def test_a_multi_arch_index_gives_linux_amd64(tmp_path: Path) -> None:
    src = tmp_path / "src"
    arm = write_image(src, [[File("arch", b"arm64")]], ImageConfig(architecture="arm64"))
    amd = write_image(src, [[File("arch", b"amd64")]], ImageConfig(architecture="amd64"))
    write_index(src, [arm, amd])
    image = unpack(src, tmp_path / "root", tmp_path / "work")
    assert image.digest == amd["digest"]
    assert (tmp_path / "root/arch").read_bytes() == b"amd64"


def test_a_nested_index_is_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    amd = write_image(src, [[File("arch", b"amd64")]])
    inner = {"schemaVersion": 2, "mediaType": oci.INDEX_TYPES[0], "manifests": [amd]}
    write_index(src, [write_json(src, inner, oci.INDEX_TYPES[0])])
    assert inspect(src).digest == amd["digest"]


def test_a_zstd_layer_is_read(tmp_path: Path) -> None:
    tar = layer_tar([Dir("etc"), File("etc/z", b"zstd layer")])
    zst = subprocess.run(["zstd", "-q", "-c"], input=tar, capture_output=True, check=True).stdout
    write_layout(tmp_path / "src", [Blob(zst, "application/vnd.oci.image.layer.v1.tar+zstd")])
    # Blob's diff_id defaults to the blob's own digest: give the tar's
    write_layout(
        tmp_path / "src2",
        [Blob(zst, "application/vnd.oci.image.layer.v1.tar+zstd", diff_id=sha256(tar))],
    )
    unpack(tmp_path / "src2", tmp_path / "root", tmp_path / "work")
    assert (tmp_path / "root/etc/z").read_bytes() == b"zstd layer"
    with pytest.raises(OciError, match="diff_id"):
        unpack(tmp_path / "src", tmp_path / "root2", tmp_path / "work")


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo not installed")
def test_what_skopeo_writes_imports_the_same(tmp_path: Path) -> None:
    """Our docker-save tarball and OCI archive are what the real tools read, and the layouts
    and archives skopeo writes from them import to the same tree."""
    write_docker_save(tmp_path / "docker.tar", BASE, CONFIG_FULL)
    write_oci_archive(tmp_path / "ours.tar", BASE, CONFIG_FULL)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    copies = [
        ("docker-archive:docker.tar", "oci:skopeo-layout:img"),
        ("docker-archive:docker.tar", "oci-archive:skopeo-archive.tar"),
        ("oci-archive:ours.tar", "oci:from-ours:img"),
        ("oci-archive:ours.tar", "docker-archive:skopeo-docker.tar:test:latest"),
    ]
    for src, dest in copies:
        subprocess.run(
            ["skopeo", "--insecure-policy", "copy", "-q", src, dest],
            cwd=tmp_path,
            env=env,
            check=True,
            capture_output=True,
        )
    expected = None
    names = ("docker.tar", "skopeo-layout", "skopeo-archive.tar", "from-ours", "skopeo-docker.tar")
    for name in names:
        image = unpack(tmp_path / name, tmp_path / f"root-{name}", tmp_path / "work")
        assert image.config.env == CONFIG_FULL.env
        tree = snapshot(tmp_path / f"root-{name}")
        expected = expected or tree
        assert tree == expected, name


def test_busybox_layout_is_a_root_filesystem_without_libc(tmp_path: Path) -> None:
    busybox_layout(tmp_path / "bb")
    unpack(tmp_path / "bb", tmp_path / "root", tmp_path / "work")
    root = tmp_path / "root"
    assert sorted(p.name for p in root.iterdir()) == [
        "bin",
        "dev",
        "etc",
        "proc",
        "root",
        "sys",
        "tmp",
    ]
    assert os.readlink(root / "bin/sh") == "/bin/busybox"
    assert not list(root.rglob("*.so*")) and not list(root.rglob("python*"))
    # runs with no loader and no libc in the tree: the busybox is static
    out = subprocess.run(
        ["chroot", str(root), "/bin/sh", "-c", "echo hello from $(ls /bin | wc -l) applets"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == f"hello from {len(BUSYBOX_APPLETS) + 1} applets"


def test_make_ext4_packs_a_tree_debugfs_can_list(tmp_path: Path) -> None:
    src = tmp_path / "src"
    owned: Layer = [
        Dir("data", mode=0o750, uid=1234, gid=5678),
        File("data/f", b"x", mode=0o640, uid=1234, gid=5678),
    ]
    write_layout(src, [*BASE, owned])
    unpack(src, tmp_path / "root", tmp_path / "work")
    dest = tmp_path / "rootfs.ext4"
    make_ext4(tmp_path / "root", dest, extra_mib=64)

    def debugfs(request: str) -> str:
        return subprocess.run(
            ["debugfs", "-R", request, str(dest)], capture_output=True, text=True, check=True
        ).stdout

    listing = debugfs("ls -l /")
    for name in ("etc", "opt", "bin", "lib", "usr", "tmp", "home"):
        assert f" {name}" in listing, listing
    assert "top" in debugfs("cat /etc/hostname")
    assert "usr/lib" in debugfs("stat /lib")
    tool = debugfs("stat /bin/tool")
    assert "Links: 2" in tool and "Mode:  04755" in tool
    owned_stat = debugfs("stat /data/f")
    assert "User:  1234   Group:  5678" in owned_stat and "Mode:  0640" in owned_stat
    assert "user.origin" in debugfs("ea_list /usr/lib/libx.so")
    st = dest.stat()
    assert st.st_blocks * 512 < st.st_size  # sparse
    assert not list(tmp_path.glob(".rootfs.ext4.tmp"))


def test_import_ext4_in_one_call(tmp_path: Path) -> None:
    busybox_layout(tmp_path / "bb")
    image = import_ext4(tmp_path / "bb", tmp_path / "bb.ext4", tmp_path / "work", extra_mib=16)
    assert image.config.cmd == ["/bin/sh"] and image.unpacked_bytes > 500_000
    listing = subprocess.run(
        ["debugfs", "-R", "ls -l /bin", str(tmp_path / "bb.ext4")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "busybox" in listing and " sh" in listing
    assert not any((tmp_path / "work").iterdir())
    write_layout(tmp_path / "bad", [[Raw("/abs")]])
    with pytest.raises(OciError, match="absolute path"):
        import_ext4(tmp_path / "bad", tmp_path / "bad.ext4", tmp_path / "work")
    assert not (tmp_path / "bad.ext4").exists() and not any((tmp_path / "work").iterdir())


def test_make_ext4_error_is_clear_and_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out.ext4"
    with pytest.raises(OciError, match=r"mkfs\.ext4 failed"):
        make_ext4(tmp_path / "no-such-tree", dest)
    assert not dest.exists() and not list(tmp_path.iterdir())


# -- refusals ------------------------------------------------------------------------------


def _layout(layers: list[Layer]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        write_layout(tmp / "src", [[Dir("etc"), File("etc/ok", b"ok")], *layers])
        return tmp / "src"

    return make


def _tampered(change: Callable[[Path, dict[str, Any]], None]) -> Callable[[Path], Path]:
    """A good layout, then `change(layout, manifest)`."""

    def make(tmp: Path) -> Path:
        src = tmp / "src"
        digest = write_layout(src, [[File("a", b"a")], [File("b", b"b" * 100)]])
        manifest = json.loads((src / "blobs/sha256" / digest[7:]).read_bytes())
        change(src, manifest)
        write_index(src, [write_json(src, manifest, MANIFEST)])
        return src

    return make


def _blob_path(src: Path, desc: dict[str, Any]) -> Path:
    return src / "blobs/sha256" / str(desc["digest"])[7:]


def _flip_a_byte(src: Path, manifest: dict[str, Any]) -> None:
    path = _blob_path(src, manifest["layers"][1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _with_manifest(document: bytes, config: bytes | None = None) -> Callable[[Path], Path]:
    """An index pointing at `document` as its manifest (and `config` as a blob)."""

    def make(tmp: Path) -> Path:
        src = tmp / "src"
        if config is not None:
            write_blob(src, config, CONFIG)
        write_index(src, [write_blob(src, document, MANIFEST)])
        return src

    return make


def _manifest_with_config(config: dict[str, Any]) -> Callable[[Path], Path]:
    def make(tmp: Path) -> Path:
        src = tmp / "src"
        config_bytes = json.dumps(config).encode()
        cdesc = write_blob(src, config_bytes, CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": MANIFEST, "config": cdesc, "layers": []}
        write_index(src, [write_json(src, manifest, MANIFEST)])
        return src

    return make


def _truncated_archive(tmp: Path) -> Path:
    write_oci_archive(tmp / "src.tar", [[File("big", os.urandom(200_000))]], compress=False)
    data = (tmp / "src.tar").read_bytes()
    (tmp / "src.tar").write_bytes(data[: len(data) // 2])
    return tmp / "src.tar"


def _docker_missing_layer(tmp: Path) -> Path:
    write_docker_save(tmp / "src.tar", [[File("a")]])
    with tarfile.open(tmp / "src.tar") as tar:
        members = [(m, tar.extractfile(m)) for m in tar.getmembers()]
        kept = [(m, f.read() if f else None) for m, f in members if "layer.tar" not in m.name]
    with tarfile.open(tmp / "src.tar", "w") as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)
    return tmp / "src.tar"


def _multi_arch_without_amd64(tmp: Path) -> Path:
    src = tmp / "src"
    arm = write_image(src, [[File("a")]], ImageConfig(architecture="arm64"))
    s390 = write_image(src, [[File("a")]], ImageConfig(architecture="s390x"))
    write_index(src, [arm, s390])
    return src


def _two_images_without_platform(tmp: Path) -> Path:
    src = tmp / "src"
    one = write_image(src, [[File("a", b"1")]])
    two = write_image(src, [[File("a", b"2")]])
    for desc, tag in ((one, "one"), (two, "two")):
        del desc["platform"]
        desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    write_index(src, [one, two])
    return src


def _not_an_image_dir(tmp: Path) -> Path:
    (tmp / "src").mkdir()
    (tmp / "src" / "index.json").write_text("{}")
    return tmp / "src"


def _random_file(tmp: Path) -> Path:
    (tmp / "src.tar").write_bytes(os.urandom(5000))
    return tmp / "src.tar"


def _tar_without_image(tmp: Path) -> Path:
    with tarfile.open(tmp / "src.tar", "w") as tar:
        tar.add(__file__, "hello.py")
    return tmp / "src.tar"


GOOD_TAR = layer_tar([File("x", b"x" * 5000)])
BAD_CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "absolute path": (_layout([[Raw("/tmp/escaped", content=b"x")]]), "absolute path"),
    "dot-dot entry": (_layout([[Raw("../escaped", content=b"x")]]), "climbs out"),
    "dot-dot inside": (_layout([[Raw("etc/../../escaped", content=b"x")]]), "climbs out"),
    "hardlink absolute": (
        _layout([[Raw("etc/h", tarfile.LNKTYPE, "/etc/passwd")]]),
        "absolute path",
    ),
    "hardlink escaping": (
        _layout([[Raw("etc/h", tarfile.LNKTYPE, "../escaped")]]),
        "climbs out",
    ),
    "hardlink to nothing": (
        _layout([[Raw("etc/h", tarfile.LNKTYPE, "etc/never-made")]]),
        "names no file",
    ),
    "hardlink to a whited-out file": (
        _layout([[Whiteout("etc/ok"), Raw("etc/h", tarfile.LNKTYPE, "etc/ok")]]),
        "names no file",
    ),
    "symlink escaping": (
        _layout([[Symlink("etc/link", "../../escaped")]]),
        "points outside",
    ),
    "symlink escaping at top": (_layout([[Symlink("link", "..")]]), "points outside"),
    "unsupported tar type": (
        _layout([[Raw("etc/s", tarfile.GNUTYPE_SPARSE)]]),
        "unsupported tar type",
    ),
    "digest mismatch": (_tampered(_flip_a_byte), "does not match its digest"),
    "blob larger than its descriptor": (
        _tampered(lambda src, m: m["layers"][1].update(size=m["layers"][1]["size"] - 10)),
        "larger than its descriptor",
    ),
    "blob smaller than its descriptor": (
        _tampered(lambda src, m: m["layers"][1].update(size=m["layers"][1]["size"] + 10)),
        "its descriptor says",
    ),
    "layer size absurd": (
        _tampered(lambda src, m: m["layers"][1].update(size=1 << 50)),
        "over the limit",
    ),
    "sha512 digest": (
        _tampered(lambda src, m: m["layers"][1].update(digest="sha512:" + "0" * 128)),
        "is not sha256",
    ),
    "hardlink to a lower file an opaque dir hid": (
        _layout([[Opaque("etc"), Raw("etc/h", tarfile.LNKTYPE, "etc/ok")]]),
        "names no file",
    ),
    "hardlink into a hidden dot dir": (
        _layout(
            [
                [Dir(".cfg"), File(".cfg/a", b"a")],
                [Opaque(".cfg"), Raw(".cfg/b", tarfile.LNKTYPE, ".cfg/a")],
            ]
        ),
        "names no file",
    ),
    "missing layer blob": (
        _tampered(lambda src, m: _blob_path(src, m["layers"][1]).unlink()),
        "is missing",
    ),
    "missing config blob": (
        _tampered(lambda src, m: _blob_path(src, m["config"]).unlink()),
        "is missing",
    ),
    "truncated gzip": (
        _layout([Blob(gzip_bytes(GOOD_TAR)[:-30], diff_id=sha256(GOOD_TAR))]),
        "layer 2 of 2 .* is corrupt or truncated",
    ),
    "corrupt gzip": (
        _layout([Blob(b"\x1f\x8b\x08\x00" + os.urandom(300), diff_id=sha256(GOOD_TAR))]),
        "layer 2 of 2 .* is corrupt or truncated",
    ),
    "not a tar inside": (
        _layout([Blob(gzip_bytes(os.urandom(3000)))]),
        "corrupt or truncated",
    ),
    "diff_id mismatch": (
        _layout([Blob(gzip_bytes(GOOD_TAR), diff_id=sha256(b"other"))]),
        "diff_id",
    ),
    "manifest not JSON": (_with_manifest(b"{not json"), "not valid JSON"),
    "manifest of wrong type": (_with_manifest(b"[1, 2]"), "should be a dict"),
    "layers of wrong type": (
        _with_manifest(json.dumps({"config": {}, "layers": "x"}).encode()),
        "should be a",
    ),
    "config env of wrong type": (
        _manifest_with_config({"rootfs": {"diff_ids": []}, "config": {"Env": "A=1"}}),
        "Env should be a list",
    ),
    "config without rootfs": (_manifest_with_config({"config": {}}), "rootfs should be"),
    "config for another arch": (
        _manifest_with_config({"architecture": "arm64", "rootfs": {"diff_ids": []}}),
        "capsules run linux/amd64",
    ),
    "diff_ids count": (
        _manifest_with_config({"rootfs": {"diff_ids": [sha256(b"x")]}}),
        "1 diff_ids for 0 layers",
    ),
    "multi-arch without amd64": (_multi_arch_without_amd64, "none for linux/amd64"),
    "two images, no platforms": (_two_images_without_platform, r"2 images \(one, two\)"),
    "truncated archive": (_truncated_archive, "corrupt or truncated"),
    "docker-save missing layer": (_docker_missing_layer, "layer .* is missing"),
    "directory without oci-layout": (_not_an_image_dir, "not an OCI image layout"),
    "random bytes": (_random_file, "neither an OCI layout directory nor a tar"),
    "tar of something else": (_tar_without_image, "neither index.json"),
    "missing source": (lambda tmp: tmp / "src", "no such file"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_refused_and_nothing_is_written_outside(
    case: str, area: dict[str, Path]
) -> None:
    make, message = BAD_CASES[case]
    src = make(area["tmp"])
    before = snapshot(area["tmp"])
    with pytest.raises(OciError, match=message) as caught:
        unpack(src, area["rootfs"], area["work"])
    assert isinstance(caught.value, RecipeError)
    assert "Traceback" not in str(caught.value)
    assert_nothing_left(area)
    after = {k: v for k, v in snapshot(area["tmp"]).items() if not k.startswith("work")}
    assert after == {k: v for k, v in before.items() if not k.startswith("work")}


def test_a_bad_last_layer_leaves_an_existing_rootfs_empty(area: dict[str, Path]) -> None:
    """Every layer is checked before the first is applied."""
    src = area["tmp"] / "src"
    write_layout(src, [[File("a", b"a")], [File("b", b"b")], [Raw("/abs", content=b"x")]])
    area["rootfs"].mkdir()
    with pytest.raises(OciError, match="layer 3 of 3"):
        unpack(src, area["rootfs"], area["work"])
    assert area["rootfs"].is_dir() and not any(area["rootfs"].iterdir())


def test_a_failure_while_applying_empties_the_rootfs(
    area: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """umoci ran (files written), then the import fails (as on a full disk)."""
    real = oci._run_umoci

    def apply_then_fail(layout: Path, rootfs: Path, tmp: Path) -> None:
        real(layout, rootfs, tmp)
        assert (rootfs / "etc/ok").exists()
        raise OciError("the disk is full")

    monkeypatch.setattr(oci, "_run_umoci", apply_then_fail)
    with pytest.raises(OciError, match="disk is full"):
        unpack(_layout([])(area["tmp"]), area["rootfs"], area["work"])
    assert_nothing_left(area)


def test_absurd_sizes_are_refused(area: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    src = _layout([[File("big", b"z" * 200_000)]])(area["tmp"])
    monkeypatch.setattr(oci, "MAX_UNPACKED_BYTES", 100_000)
    with pytest.raises(OciError, match="unpacks to more than"):
        unpack(src, area["rootfs"], area["work"])
    assert_nothing_left(area)
    monkeypatch.setattr(oci, "MAX_UNPACKED_BYTES", 1 << 30)
    monkeypatch.setattr(oci, "MAX_JSON_BYTES", 100)
    with pytest.raises(OciError, match=r"over the limit|larger than"):
        unpack(src, area["rootfs"], area["work"])
    assert_nothing_left(area)


def test_junk_after_a_layers_tar_is_capped(
    area: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small gzip can hide a huge run of zeros after the tar's end: it is not read forever."""
    padded = GOOD_TAR + bytes(3 << 20)
    src = _layout([Blob(gzip_bytes(padded), diff_id=sha256(padded))])(area["tmp"])
    monkeypatch.setattr(oci, "MAX_TRAILING_BYTES", 1 << 20)
    with pytest.raises(OciError, match="follow the end of its tar"):
        unpack(src, area["rootfs"], area["work"])
    assert_nothing_left(area)
    monkeypatch.setattr(oci, "MAX_TRAILING_BYTES", 4 << 20)
    unpack(src, area["rootfs"], area["work"])
    assert (area["rootfs"] / "x").stat().st_size == 5000


def test_a_non_empty_rootfs_is_refused(area: dict[str, Path]) -> None:
    src = _layout([])(area["tmp"])
    area["rootfs"].mkdir()
    (area["rootfs"] / "mine").write_text("keep")
    with pytest.raises(OciError, match="must be an empty directory"):
        unpack(src, area["rootfs"], area["work"])
    assert (area["rootfs"] / "mine").read_text() == "keep"


def test_our_additions_to_an_imported_root_never_follow_its_links(tmp_path: Path) -> None:
    """A hostile image's `etc -> <host dir>`, `.wrenn -> <host dir>` and a resolv.conf
    symlink to a host file: prepare_root replaces the links and writes nothing through them."""
    from backend.recipes.oci_base import prepare_root

    host_dir = tmp_path / "host-etc"
    host_dir.mkdir()
    (host_dir / "resolv.conf").write_text("host's own\n")
    host_file = tmp_path / "host-file"
    host_file.write_text("untouched\n")
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").symlink_to(host_dir)
    (root / ".wrenn").symlink_to(host_dir)
    other = tmp_path / "root2"
    (other / "etc").mkdir(parents=True)
    (other / "etc" / "resolv.conf").symlink_to(host_file)
    (other / ".wrenn").mkdir()
    (other / ".wrenn" / "planted").write_text("x")
    for tree in (root, other):
        prepare_root(tree)
        assert (tree / "etc").is_dir() and not (tree / "etc").is_symlink()
        assert (tree / ".wrenn").is_dir() and not (tree / ".wrenn").is_symlink()
        assert list((tree / ".wrenn").iterdir()) == []
        resolv = tree / "etc" / "resolv.conf"
        assert not resolv.is_symlink() and resolv.read_text() == "nameserver 10.0.2.3\n"
    assert (host_dir / "resolv.conf").read_text() == "host's own\n"
    assert sorted(p.name for p in host_dir.iterdir()) == ["resolv.conf"]
    assert host_file.read_text() == "untouched\n"


def test_a_numeric_image_user_is_said_and_left_as_root() -> None:
    from backend.recipes.builder import Defaults
    from backend.recipes.oci import OciConfig

    said: list[str] = []
    config = OciConfig({"PATH": "/bin"}, "/srv", "65532:65532", [], [])
    defaults = Defaults.of_image(config, said.append)
    assert defaults.user == "" and defaults.workdir == "/srv"
    assert said and "65532:65532" in said[0]
    named = Defaults.of_image(OciConfig({}, "", "app", [], []), said.append)
    assert named.user == "app" and named.init_body() == {"defaultUser": "app"}
