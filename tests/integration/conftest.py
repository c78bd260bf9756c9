from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator

import pytest

from backend.capsules.manager import CapsuleManager
from backend.config import Paths

pytestmark = pytest.mark.vm


@pytest.fixture
async def manager(paths: Paths) -> AsyncIterator[CapsuleManager]:
    m = CapsuleManager(paths)
    await m.start(watchdog=False)
    try:
        yield m
    finally:
        await destroy_all(paths)
        with contextlib.suppress(Exception):
            await m.close()


@pytest.fixture
def scratch_images(paths: Paths) -> Iterator[list[str]]:
    """Names of images a test installs in the shared images dir (an OCI import, a derived
    image): removed, every version, when the test ends."""
    names: list[str] = []
    yield names
    for name in names:
        for path in paths.images.glob(f"{name}*"):
            if path.is_symlink():
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)


async def destroy_all(paths: Paths) -> None:
    """Leave no QEMU behind, whatever state the test left the capsules in."""
    cleaner = CapsuleManager(paths)
    try:
        for capsule in cleaner.list_capsules():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cleaner.destroy(capsule.id), 30)
    finally:
        await cleaner.close()


async def sh(manager: CapsuleManager, capsule_id: str, cmd: str) -> str:
    """Run a shell command in a capsule; it must succeed. Returns its stdout."""
    result = await manager.exec(capsule_id, cmd)
    assert result.exit_code == 0, f"{cmd!r} -> {result.exit_code}: {result.stderr}"
    return result.stdout
