"""The Wrenn SDK (``wrenn==0.3.0``, which needs Python >= 3.13) in a venv of its own, made
from PyPI on first use and reused (the tests and bench/wrenn_api.py call this)."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import subprocess
from pathlib import Path

SDK_VERSION = "0.3.0"
SDK_VENV = Path(f"/tmp/wrenn-sdk-venv-{SDK_VERSION}")
READY_MARK = ".wrenn-ready"


class NoPython313(RuntimeError):
    pass


def find_python() -> str | None:
    """A Python >= 3.13: on PATH, or under pyenv (``$PYENV_ROOT`` or ``~/.pyenv``)."""
    candidates = [shutil.which(f"python3.{minor}") for minor in range(13, 20)]
    root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{root}/versions/3.1[3-9]*/bin/python3"), reverse=True)
    candidates.append(shutil.which("python3"))
    for candidate in candidates:
        if not candidate:
            continue
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info >= (3, 13))"],
            capture_output=True,
            text=True,
        )
        if probe.stdout.strip() == "True":
            return candidate
    return None


def ensure_sdk_venv(venv: Path = SDK_VENV) -> Path:
    """The venv's python; a half-made venv (no ready mark) is made again."""
    python = venv / "bin" / "python"
    with open(f"{venv}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / READY_MARK).is_file() and python.exists():
            return python
        base = find_python()
        if base is None:
            raise NoPython313(
                "the Wrenn SDK needs Python >= 3.13 and none was found: install one "
                "(`pyenv install 3.13`, or apt-get install python3.13) and re-run"
            )
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
             f"wrenn=={SDK_VERSION}"],
            check=True,
        )  # fmt: skip
        (venv / READY_MARK).write_text(SDK_VERSION + "\n")
    return python
