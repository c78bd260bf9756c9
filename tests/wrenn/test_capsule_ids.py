"""`CapsuleManager.create(capsule_id=...)`: the Wrenn API names a capsule before its start is
done (it answers `starting` after 20 s); a bad or taken id is refused before anything starts."""

from __future__ import annotations

import time

import pytest

from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from backend.config import Paths


async def test_a_bad_or_taken_id_is_refused(paths: Paths) -> None:
    manager = CapsuleManager(paths)
    try:
        with pytest.raises(CapsuleError, match="invalid capsule id"):
            await manager.create(capsule_id="../etc")
        taken = Capsule(
            id="cl-000000000001",
            state=State.PAUSED,
            template="default",
            image_dir="/nonexistent",
            memory_mib=256,
            vcpus=1,
            created_at=time.time(),
            host_port=1,
            access_token="t",
        )
        manager.store.put(taken)
        with pytest.raises(CapsuleError, match="exists already"):
            await manager.create(capsule_id=taken.id)
        assert [c.id for c in manager.list_capsules()] == [taken.id]
    finally:
        await manager.close()
