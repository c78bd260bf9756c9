"""One lifecycle lock per capsule, across tasks and across processes (dashboard + CLI)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

from backend.capsules.errors import CapsuleError


class CapsuleLocks:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._local: dict[str, asyncio.Lock] = {}

    def _path(self, capsule_id: str) -> Path:
        return self.directory / f"{capsule_id}.lock"

    def busy(self, capsule_id: str) -> bool:
        lock = self._local.get(capsule_id)
        return lock is not None and lock.locked()

    @contextlib.asynccontextmanager
    async def hold(self, capsule_id: str, timeout: float = 300.0) -> AsyncIterator[None]:
        local = self._local.setdefault(capsule_id, asyncio.Lock())
        async with local:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._path(capsule_id), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise CapsuleError(
                                f"{capsule_id} is busy in another wrenn-tui process"
                            ) from None
                        await asyncio.sleep(0.05)
                try:
                    yield
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def remove(self, capsule_id: str) -> None:
        self._path(capsule_id).unlink(missing_ok=True)
        self._local.pop(capsule_id, None)
