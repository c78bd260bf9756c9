"""What a running build is doing, readable from any process (the dashboard shows builds started
by the CLI): `build.json` in the build's locked work dir, rewritten (tmp + rename) at each
progress or output line (a few tens of microseconds). A build whose work dir lock is free is
over (or was killed), and is not listed."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATUS_FILE = "build.json"
LOG_LINES = 200


@dataclass
class BuildStatus:
    name: str
    recipe: str
    started_at: float
    step: int = 0
    """1-based; 0 before the first step."""
    steps: int = 0
    current: str = ""
    """The step's progress line."""
    log: list[str] = field(default_factory=list)
    """The latest progress and output lines."""


class StatusWriter:
    def __init__(self, work: Path, status: BuildStatus) -> None:
        self.path = work / STATUS_FILE
        self.status = status
        self.write()

    def progress(self, line: str, step: int | None = None) -> None:
        if step is not None:
            self.status.step = step
            self.status.current = line
        self._add(line)
        self.write()

    def output(self, line: str) -> None:
        self._add(f"   {line}")
        self.write()

    def _add(self, line: str) -> None:
        self.status.log.append(line)
        del self.status.log[:-LOG_LINES]

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(asdict(self.status)))
            tmp.rename(self.path)


def active_builds(work_root: Path) -> list[BuildStatus]:
    """The builds running now, in any process (their work dir's lock is held)."""
    found: list[BuildStatus] = []
    if not work_root.is_dir():
        return found
    for work in sorted(work_root.glob("build-*")):
        try:
            fd = os.open(work / ".lock", os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            continue  # nobody holds it: the build is over
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        with contextlib.suppress(OSError, ValueError, TypeError):
            found.append(BuildStatus(**json.loads((work / STATUS_FILE).read_text())))
    return found
