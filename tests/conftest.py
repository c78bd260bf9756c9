"""Shared fixtures: the real image (built by `make setup`) and scratch state dirs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.config import Paths, default_paths
from backend.image.builder import ImageBuilder


def scratch_paths(root: Path) -> Paths:
    """The real image and caches, with a private state dir (short: QMP socket paths are
    limited to 108 bytes)."""
    base = default_paths()
    return Paths(
        data=base.data, state=root / "state", cache=base.cache, config=root / "config", shm=base.shm
    )


@pytest.fixture(scope="session")
def built_image() -> Path:
    status = ImageBuilder(default_paths()).status()
    if status.manifest is None:
        pytest.fail("no capsule image: run `make setup` (it builds the default image)")
    if not status.up_to_date:
        pytest.fail("the capsule image is outdated: run `make setup` to rebuild it")
    return status.path.resolve()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="wt-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def paths(short_tmp: Path, built_image: Path) -> Paths:
    p = scratch_paths(short_tmp)
    p.ensure()
    return p


@pytest.fixture
def tiny_fs(short_tmp: Path) -> Iterator[Path]:
    """A 128 KiB tmpfs, to run a write out of space for real."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root to mount a small tmpfs (the suite runs as root)")
    mount = short_tmp / "tiny"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=128k,mode=0700", "tmpfs", str(mount)], check=True
    )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
