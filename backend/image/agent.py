"""The agent disk: envd and PID 1 with their own Python, independent of the image's userland.

Every capsule gets the same read-only disk (`agent.ext4`, the second virtio-blk device), which
the stage-1 initramfs mounts at AGENT_MOUNT inside the capsule's root before switching to it.
It holds:

    lib/            the dynamic loader and every shared library the interpreter, the stdlib's
                    extension modules and envd's wheels need (resolved with the base root's
                    own `ldd`), so a musl image or one with no libc at all still runs envd
    python/         Debian's python3 binary and its stdlib (minus tests, GUI and the modules
                    whose libraries are not carried), byte-compiled
    envd/backend/   envd's source; site/ its pinned wheels
    init            PID 1 (assets/guest/wrenn-init)

Programs on it are started through the carried loader (`lib/ld-linux-x86-64.so.2 --library-path
lib python/bin/python3.X ...`), so neither the image's loader nor its libc nor its
/usr is used: the image's own `/usr` stays exactly as the image had it, and a user's `python3`
in the capsule is the image's (if any), never the agent's (`-S`: the agent's interpreter does
not read the image's site-packages either).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from backend.image.errors import ImageBuildError
from backend.image.tools import mkfs_ext4, run

AGENT_MOUNT = "/.wrenn"
"""Where the agent disk is mounted in every capsule (read-only)."""
AGENT_LABEL = "wrenn-agent"
"""The ext4 label and the virtio-blk serial of the agent disk (stage 1 finds it by serial)."""
LOADER = "ld-linux-x86-64.so.2"

STDLIB_DROP = (
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "venv",
)
"""Parts of the stdlib envd never imports (about half of its size)."""
DYNLOAD_DROP = re.compile(
    r"^(_test|xxlimited|_xxtestfuzz|_xxsubinterpreters|_dbm|nis|_curses|readline|ossaudiodev)"
)
"""Extension modules not carried (their libraries would pull in Kerberos, ncurses, Berkeley DB)."""


def guest_command(python_version: str, *args: str) -> list[str]:
    """argv that runs the agent's Python in a capsule with `args`."""
    return [
        f"{AGENT_MOUNT}/lib/{LOADER}",
        "--library-path",
        f"{AGENT_MOUNT}/lib",
        f"{AGENT_MOUNT}/python/bin/python{python_version}",
        *args,
    ]


def _needed_libraries(base_rootfs: Path, binaries: list[Path]) -> set[Path]:
    """Paths (inside base_rootfs) of the shared libraries `binaries` need, transitively, as
    the base root's own `ldd` resolves them."""
    libs: set[Path] = set()
    for binary in binaries:
        inside = "/" + str(binary.relative_to(base_rootfs))
        result = run(["chroot", base_rootfs, "ldd", inside], what=f"ldd {inside}")
        for line in result.splitlines():
            m = re.search(r"=>\s+(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
            if m:
                libs.add(Path(m.group(1)))
    return libs


def build_agent_tree(
    base_rootfs: Path,
    python_version: str,
    wheels_site: Path,
    envd_package: Path,
    backend_init: Path,
    wrenn_init: Path,
    image_info: str,
    tree: Path,
) -> None:
    """Lay the agent out in `tree` (empty or absent)."""
    py = f"python{python_version}"
    binary = base_rootfs / "usr" / "bin" / py
    stdlib = base_rootfs / "usr" / "lib" / py
    if not binary.is_file() or not (stdlib / "os.py").is_file():
        raise ImageBuildError(f"the base root filesystem has no {py} with its stdlib")
    (tree / "python" / "bin").mkdir(parents=True)
    shutil.copy2(binary, tree / "python" / "bin" / py)
    shutil.copytree(
        stdlib,
        tree / "python" / "lib" / py,
        symlinks=True,
        ignore=_stdlib_ignore(stdlib),
    )
    shutil.copytree(wheels_site, tree / "site", symlinks=True)
    extensions = [
        p
        for root in (tree / "python" / "lib" / py / "lib-dynload", tree / "site")
        for p in root.rglob("*.so")
    ]
    inside = [base_rootfs / "usr" / "bin" / py]
    # ldd runs in the base root: point it at the base's copies of the carried extensions
    for ext in extensions:
        rel = ext.relative_to(tree)
        if rel.parts[0] == "python":
            inside.append(base_rootfs / "usr" / "lib" / Path(*rel.parts[2:]))
    libs = _needed_libraries(base_rootfs, inside)
    wheel_exts = [e for e in extensions if e.relative_to(tree).parts[0] == "site"]
    if wheel_exts:
        # wheels' extensions are not in the base root: copy them in for ldd, then remove
        probe = base_rootfs / "tmp" / ".wrenn-ldd"
        probe.mkdir(parents=True, exist_ok=True)
        try:
            copies = []
            for i, ext in enumerate(wheel_exts):
                copy = probe / f"{i}-{ext.name}"
                shutil.copy2(ext, copy)
                copies.append(copy)
            libs |= _needed_libraries(base_rootfs, copies)
        finally:
            shutil.rmtree(probe, ignore_errors=True)
    lib_dir = tree / "lib"
    lib_dir.mkdir()
    for lib in sorted(libs):
        source = base_rootfs / lib.relative_to("/")
        # copy the file a symlink names, under the name the binaries ask for
        shutil.copyfile(source.resolve() if source.is_symlink() else source, lib_dir / lib.name)
        (lib_dir / lib.name).chmod(0o755)
    if not (lib_dir / LOADER).is_file():
        raise ImageBuildError(f"ldd named no {LOADER}: cannot carry the dynamic loader")
    envd_root = tree / "envd" / "backend"
    shutil.copytree(
        envd_package,
        envd_root / "envd",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    shutil.copy2(backend_init, envd_root / "__init__.py")
    shutil.copy2(wrenn_init, tree / "init")
    (tree / "init").chmod(0o755)
    (tree / "image.json").write_text(image_info)
    # .pyc made by the agent's own interpreter (run here through its own loader): importing
    # the server stack without them costs the guest seconds at every cold boot. The paths
    # recorded in them are the guest's.
    run(
        [
            lib_dir / LOADER,
            "--library-path",
            lib_dir,
            tree / "python" / "bin" / py,
            "-S",
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(tree),
            "-p",
            AGENT_MOUNT,
            tree / "python" / "lib" / py,
            tree / "site",
            tree / "envd",
        ],
        what="byte-compiling the agent",
    )


def _stdlib_ignore(stdlib: Path) -> Callable[[str, list[str]], list[str]]:
    def ignore(directory: str, names: list[str]) -> list[str]:
        here = Path(directory)
        dropped = []
        for name in names:
            compiled = name == "__pycache__" or name.endswith(".pyc")
            unused = here == stdlib and (
                name in STDLIB_DROP
                or name.startswith("config-")
                or name in ("site-packages", "dist-packages")
            )
            uncarried = here.name == "lib-dynload" and DYNLOAD_DROP.match(name) is not None
            if compiled or unused or uncarried:
                dropped.append(name)
        return dropped

    return ignore


def pack_agent(tree: Path, dest: Path) -> None:
    """`tree` as a small ext4 with no journal (it is only ever mounted read-only)."""
    used = sum(p.lstat().st_size for p in tree.rglob("*")) >> 20
    mkfs_ext4(tree, dest, used + used // 4 + 16, AGENT_LABEL, "-O", "^has_journal", "-m", "0")
