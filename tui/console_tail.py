"""`tail -F` for a capsule's console log, read a tick at a time without blocking on growth."""

from __future__ import annotations

import os
from pathlib import Path

TAIL_BYTES = 16 * 1024
"""How much of an existing log to show when it is first opened (or replaced)."""


class ConsoleTail:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._inode: int | None = None
        self._offset = 0

    def read(self) -> tuple[bool, str]:
        """(restarted, text appended since the last call). Restarted means the log was replaced
        (a resume starts a new one) or truncated: what was shown before no longer applies."""
        try:
            with self.path.open("rb") as f:
                info = os.fstat(f.fileno())
                restarted = info.st_ino != self._inode or info.st_size < self._offset
                start = max(0, info.st_size - TAIL_BYTES) if restarted else self._offset
                f.seek(start)
                data = f.read()
        except OSError:
            return False, ""
        self._inode = info.st_ino
        self._offset = start + len(data)
        return restarted, data.decode(errors="replace").replace("\r", "")
