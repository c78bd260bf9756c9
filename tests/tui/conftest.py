"""Fixtures for the dashboard tests: scratch state, host envd processes, a real sampler."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from backend.capsules.manager import CapsuleManager
from backend.config import Paths, default_paths
from backend.image.builder import ImageBuilder
from backend.sampler import ManagerSource, Sampler
from tests import hostenvd
from tests.conftest import scratch_paths
from tests.hostenvd import HostEnvd

ENVD_COUNT = 3


@pytest.fixture(scope="session")
def image_present() -> None:
    """The dashboard offers to build an image when there is none; these tests need one there
    (not necessarily current: no VM boots from it)."""
    if ImageBuilder(default_paths()).status().manifest is None:
        pytest.fail("no capsule image: run `make setup` (it builds the default image)")


@pytest.fixture
def tui_paths(short_tmp: Path, image_present: None) -> Paths:
    paths = scratch_paths(short_tmp)
    paths.ensure()
    return paths


@pytest.fixture(scope="session")
def envd_pool() -> Iterator[list[HostEnvd]]:
    with tempfile.TemporaryDirectory(prefix="wt-envd-") as tmp:
        envds = hostenvd.start_many(ENVD_COUNT, Path(tmp))
        try:
            yield envds
        finally:
            hostenvd.stop_all(envds)


@pytest.fixture
async def manager(tui_paths: Paths) -> AsyncIterator[CapsuleManager]:
    """Not started: `start()` would (rightly) mark the seeded VM-less running rows as error."""
    m = CapsuleManager(tui_paths)
    try:
        yield m
    finally:
        await m.close()


@pytest.fixture
async def sampler(manager: CapsuleManager) -> AsyncIterator[Sampler]:
    s = Sampler(ManagerSource(manager), store=manager.store)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()
