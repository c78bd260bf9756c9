"""Flattening a disk chain (backend/capsules/disks.py) with real qemu-img, no VM."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from backend.capsules.disks import backing_chain, flatten, make_overlay

MiB = 1 << 20


def qemu_io(disk: Path, command: str) -> None:
    subprocess.run(["qemu-io", "-c", command, str(disk)], check=True, capture_output=True)


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", str(a), str(b)]).returncode == 0


@pytest.mark.timeout(60)
async def test_flatten_keeps_every_layer_between_the_disk_and_its_base(tmp_path: Path) -> None:
    """capsule -> template -> rootfs: the capsule's disk flattened onto the rootfs keeps the
    template's blocks as well as its own, and reads exactly as the whole chain did."""
    base = tmp_path / "rootfs.ext4"
    with base.open("wb") as f:
        f.truncate(64 * MiB)
        f.write(b"rootfs")
    template, capsule = tmp_path / "template.qcow2", tmp_path / "capsule.qcow2"
    await make_overlay(base, template)
    qemu_io(template, "write -P 0x61 1M 64k")  # only the template's layer holds this
    qemu_io(template, "write -P 0x62 3M 64k")
    await make_overlay(template, capsule)
    qemu_io(capsule, "write -P 0x63 2M 64k")  # only the capsule's
    qemu_io(capsule, "write -P 0x64 3M 4k")  # over part of the template's

    flat = tmp_path / "flat.qcow2"
    flat.write_bytes(capsule.read_bytes())
    await flatten(flat, base)

    assert await backing_chain(flat) == [flat, base]
    assert same(flat, capsule)
    template.unlink()  # nothing of it is needed any more
    assert same(flat, base) is False
    qemu_io(flat, "read -P 0x61 1M 64k")
    qemu_io(flat, "read -P 0x63 2M 64k")
    qemu_io(flat, "read -P 0x64 3M 4k")
    qemu_io(flat, f"read -P 0x62 {3 * MiB + 4096} {60 * 1024}")
