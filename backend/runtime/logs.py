"""Logs a VMM writes for a guest (its serial console, its own log): kept bounded on the host,
whatever the runtime."""

from __future__ import annotations

import os
from pathlib import Path

CONSOLE_MAX = 1 << 20
"""console.log and qemu.log are rotated (to *.log.1) beyond this many bytes: a guest writing
its serial port without end, or making QEMU warn for every page, must not fill the host's
disk. Both are opened for appending, so the VMM writes on at the new end."""


def cap_console(path: Path, limit: int = CONSOLE_MAX) -> bool:
    """Rotate `path` when larger than `limit`: its last `limit` bytes go to `.log.1` and the
    log starts again empty (QEMU appends). True when it rotated."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size <= limit:
        return False
    with path.open("rb") as f:
        f.seek(size - limit)
        tail = f.read(limit)
    old = path.with_suffix(".log.1")
    tmp = path.with_suffix(".log.1.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(tail)
    os.replace(tmp, old)
    os.truncate(path, 0)
    return True
