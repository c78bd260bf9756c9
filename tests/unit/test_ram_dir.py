"""Guest RAM lives in a directory only the agent can use (issue 16 item 3): a directory or
file another local user planted where the agent keeps RAM files is never used."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.capsules.errors import CapsuleError
from backend.capsules.layout import CapsuleLayout
from backend.capsules.manager import CapsuleManager
from backend.config import Paths
from backend.sparse import create_holes
from tests.unit.fakes import FakeEnvds, FakeRuntime

NOBODY = 65534


@pytest.fixture
def layout(paths: Paths) -> Iterator[CapsuleLayout]:
    layout = CapsuleLayout(paths)
    shutil.rmtree(layout.ram_dir, ignore_errors=True)
    try:
        yield layout
    finally:
        if layout.ram_dir.is_symlink():
            layout.ram_dir.unlink()
        shutil.rmtree(layout.ram_dir, ignore_errors=True)


def test_ram_dir_is_private_and_named_per_user(layout: CapsuleLayout) -> None:
    made = layout.ensure_ram_dir()
    info = made.stat()
    assert info.st_uid == os.geteuid() and info.st_mode & 0o777 == 0o700
    assert str(os.geteuid()) in made.name


@pytest.mark.parametrize("plant", ["other-owner", "world-writable", "symlink", "file"])
def test_a_planted_ram_dir_is_refused(layout: CapsuleLayout, tmp_path: Path, plant: str) -> None:
    if plant == "other-owner":
        layout.ram_dir.mkdir(mode=0o700)
        os.chown(layout.ram_dir, NOBODY, NOBODY)
    elif plant == "world-writable":
        layout.ram_dir.mkdir()
        layout.ram_dir.chmod(0o777)
    elif plant == "symlink":
        target = tmp_path / "theirs"
        target.mkdir(mode=0o700)
        layout.ram_dir.symlink_to(target)
    else:
        layout.ram_dir.write_bytes(b"")
    with pytest.raises(CapsuleError, match="not a private directory"):
        layout.ensure_ram_dir()


async def test_create_refuses_a_planted_ram_dir_and_starts_nothing(
    paths: Paths, layout: CapsuleLayout
) -> None:
    layout.ram_dir.mkdir(mode=0o700)
    planted = layout.ram_dir / "planted"
    planted.write_bytes(b"theirs")
    os.chown(layout.ram_dir, NOBODY, NOBODY)
    runtime = FakeRuntime()
    manager = CapsuleManager(paths, runtime=runtime, envd=FakeEnvds())
    try:
        with pytest.raises(CapsuleError, match="not a private directory"):
            await manager.create(cold=True)
        assert runtime.live() == []
        assert sorted(p.name for p in layout.ram_dir.iterdir()) == ["planted"]
        assert planted.read_bytes() == b"theirs"
    finally:
        await manager.close()


def test_a_file_already_at_a_ram_path_is_never_reused(layout: CapsuleLayout) -> None:
    """The RAM file is always a new inode (O_EXCL after unlink): whoever held the old one
    (a hard link, an open descriptor) never sees guest memory."""
    layout.ensure_ram_dir()
    path = layout.ram_file("cl-planted")
    path.write_bytes(b"x" * 4096)
    held = path.open("rb")
    before = os.fstat(held.fileno()).st_ino
    create_holes(path, 1 << 20)
    assert path.stat().st_ino != before and path.stat().st_mode & 0o777 == 0o600
    held.close()
