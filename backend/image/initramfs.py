"""The stage-1 initramfs: static busybox, the virtio modules and an /init that mounts the root."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from backend.image.errors import ImageBuildError
from backend.image.kernel import Kernel


def module_load_order(modules_dir: Path, wanted: tuple[str, ...]) -> list[str]:
    """Module paths (relative to modules_dir) in an order where dependencies load first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (modules_dir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0]
        by_name[name] = path
        by_name[name.replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        # modules.dep lists what a module needs with the deepest dependency last
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in wanted:
        found = by_name.get(name) or by_name.get(name.replace("-", "_"))
        if found is None:
            builtin = (modules_dir / "modules.builtin").read_text()
            if f"/{name}.ko" in builtin or f"/{name.replace('-', '_')}.ko" in builtin:
                continue
            raise ImageBuildError(f"kernel module {name} is neither a module nor built in")
        visit(found)
    return order


def build_initramfs(
    kernel: Kernel, modules: tuple[str, ...], busybox: Path, init: Path, dest: Path, work: Path
) -> None:
    root = work / "initramfs"
    for sub in ("bin", "lib/modules", "proc", "sys", "dev", "newroot"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    shutil.copy2(init, root / "init")
    (root / "init").chmod(0o755)
    flat: list[str] = []
    for rel in module_load_order(kernel.modules, modules):
        name = Path(rel).name
        shutil.copy2(kernel.modules / rel, root / "lib" / "modules" / name)
        flat.append(name)
    (root / "modules.load").write_text("".join(f"{n}\n" for n in flat))
    listing = subprocess.run(
        ["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True
    ).stdout
    cpio = subprocess.run(
        ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
        cwd=root,
        input=listing,
        capture_output=True,
        check=False,
    )
    if cpio.returncode != 0:
        raise ImageBuildError(f"cpio failed: {cpio.stderr.decode(errors='replace')}")
    with gzip.open(dest, "wb", compresslevel=6) as out:
        out.write(cpio.stdout)
    shutil.rmtree(root)
