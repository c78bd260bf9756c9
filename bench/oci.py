"""OCI import benchmark: a ~50 MB OCI image layout of 3 layers (incompressible random files and
compressible text, written by tests/oci_images.py) unpacked into a rootfs and packed as ext4.

    python -m bench.oci

Prints one JSON object; bench.templates includes the same keys. `oci_import_s` is unpack +
make_ext4; `oci_import_mb_per_s` is the layout's size (compressed blobs) over that time.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from backend.recipes.oci import make_ext4, unpack
from tests.oci_images import Dir, Entry, File, Layer, Whiteout, write_layout

MB = 1 << 20


def _text(n: int, seed: int) -> bytes:
    """Compressible data: log-like lines (gzip takes them to about a fifth)."""
    lines = []
    size = 0
    i = 0
    while size < n:
        line = f"{seed:04d}-{i:08d} INFO worker={i % 17} path=/srv/app/{i % 997}.py ok {i * 7919}\n"
        lines.append(line)
        size += len(line)
        i += 1
    return "".join(lines).encode()[:n]


def bench_layers() -> list[Layer]:
    base: list[Entry] = [Dir("opt"), Dir("opt/bin"), Dir("usr/share/doc")]
    base += [File(f"opt/bin/tool{i}", os.urandom(2 * MB), mode=0o755) for i in range(12)]
    base += [File(f"usr/share/doc/doc{i}.txt", _text(MB, i)) for i in range(4)]
    middle: list[Entry] = [Dir("srv/app")]
    middle += [File(f"srv/app/mod{i}.py", _text(MB, 100 + i)) for i in range(12)]
    middle += [File(f"srv/app/data{i}.bin", os.urandom(2 * MB)) for i in range(4)]
    top: list[Entry] = [Whiteout("opt/bin/tool0"), Whiteout("usr/share/doc/doc3.txt")]
    top += [File(f"srv/app/model{i}.bin", os.urandom(2 * MB)) for i in range(8)]
    top += [File(f"srv/app/log{i}.txt", _text(MB, 200 + i)) for i in range(6)]
    return [base, middle, top]


def measure(root: Path) -> dict[str, Any]:
    layout = root / "layout"
    write_layout(layout, bench_layers())
    layout_bytes = sum(p.stat().st_size for p in layout.rglob("*") if p.is_file())
    rootfs, work, disk = root / "rootfs", root / "work", root / "rootfs.ext4"
    t = time.monotonic()
    image = unpack(layout, rootfs, work)
    unpacked_at = time.monotonic()
    make_ext4(rootfs, disk, extra_mib=64)
    done = time.monotonic()
    total = done - t
    return {
        "oci_layers": image.layers,
        "oci_layout_mb": round(layout_bytes / MB, 1),
        "oci_unpacked_mb": round(image.unpacked_bytes / MB, 1),
        "oci_unpack_s": round(unpacked_at - t, 3),
        "oci_make_ext4_s": round(done - unpacked_at, 3),
        "oci_import_s": round(total, 3),
        "oci_import_mb_per_s": round(layout_bytes / MB / total, 1),
    }


def run() -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="wb-oci-", dir="/tmp"))
    try:
        return measure(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    print(json.dumps(run(), indent=2))


if __name__ == "__main__":
    main()
