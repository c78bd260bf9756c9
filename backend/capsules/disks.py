"""Capsule disks: qcow2 overlays over a read-only base, and flattening a chain into one layer.

A capsule's disk is an overlay over its template's disk, which is itself an overlay over the
image's raw rootfs (the built-in template's disk is the rootfs itself). A template made from
a capsule is flattened against the image's rootfs, so no chain is ever longer than
capsule -> template -> image, however many times templates are made from capsules made from
templates.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from backend.capsules.errors import CapsuleError


async def _qemu_img(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "qemu-img",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        what = err.decode(errors="replace").strip() or f"exit code {proc.returncode}"
        raise CapsuleError(f"qemu-img {args[0]} failed: {what}")
    return out.decode(errors="replace")


def image_format(path: Path) -> str:
    return "qcow2" if path.suffix == ".qcow2" else "raw"


async def make_overlay(backing: Path, overlay: Path) -> None:
    """A private qcow2 overlay over `backing` (raw or qcow2, never written through it)."""
    await _qemu_img(
        "create", "-q", "-f", "qcow2", "-F", image_format(backing), "-b", str(backing),
        str(overlay),
    )  # fmt: skip
    overlay.chmod(0o600)


async def flatten(disk: Path, base: Path) -> None:
    """Make the qcow2 overlay `disk` (a private copy: it is rewritten in place) hold every block
    in which its whole chain differs from `base` (the image's rootfs), and back it on `base`
    alone. `qemu-img rebase` (safe mode) copies into `disk` what the layers between them hold.

    Not `qemu-img convert -B base`: with a target backing file, convert reads the allocation
    of the source's top layer only, so a middle layer's blocks (a template's, under a capsule
    made from it) fell through to `base`: files that capsule inherited read as zeros in the
    new template."""
    await _qemu_img(
        "rebase", "-q", "-f", "qcow2", "-b", str(base), "-F", image_format(base), str(disk),
    )  # fmt: skip
    disk.chmod(0o600)


async def backing_chain(disk: Path) -> list[Path]:
    """Every file `disk` reads through, itself first."""
    info = json.loads(await _qemu_img("info", "--output=json", "--backing-chain", str(disk)))
    return [Path(entry["filename"]) for entry in info]
