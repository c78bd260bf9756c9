"""Issue 16 item 6: a malformed row in the state database is reported as an `error` capsule
with the reason; every other capsule, the CLI and the manager keep working, and the bad one
can be destroyed."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from backend.config import Paths

REPO = Path(__file__).resolve().parents[2]

BAD_ROWS = {
    "cl-badjson00001": "{not json",
    "cl-badstate0001": json.dumps({"id": "cl-badstate0001", "state": "exploded"}),
    "cl-missing00001": json.dumps({"id": "cl-missing00001", "state": "running"}),
    "cl-wrongtype001": json.dumps(
        {
            "id": "cl-wrongtype001",
            "state": "paused",
            "template": "default",
            "image_dir": "/x",
            "memory_mib": "lots",
            "vcpus": 1,
            "created_at": 1.0,
            "host_port": 1,
            "access_token": "",
        }
    ),
}


def good(index: int) -> Capsule:
    return Capsule(
        id=f"cl-good{index:08d}",
        state=State.STOPPED,
        template="default",
        image_dir="/nonexistent",
        memory_mib=256,
        vcpus=1,
        created_at=time.time(),
        host_port=1,
        access_token="t",
    )


async def test_bad_rows_are_errors_and_the_rest_keep_working(paths: Paths) -> None:
    first = CapsuleManager(paths)
    first.store.put(good(1))
    await first.close()
    with sqlite3.connect(paths.database) as db:
        for capsule_id, data in BAD_ROWS.items():
            db.execute(
                "INSERT INTO capsules (id, data, state, updated_at) VALUES (?, ?, ?, ?)",
                (capsule_id, data, "running", time.time()),
            )
    manager = CapsuleManager(paths)
    try:
        await manager.start(watchdog=False)
        listed = {c.id: c for c in manager.list_capsules()}
        assert listed["cl-good00000001"].state == State.STOPPED
        for capsule_id in BAD_ROWS:
            assert listed[capsule_id].state == State.ERROR, capsule_id
            assert "unreadable state record" in listed[capsule_id].reason
        assert "exploded" in listed["cl-badstate0001"].reason
        assert "memory_mib" in listed["cl-wrongtype001"].reason
        assert manager.get("cl-badjson00001").state == State.ERROR

        # The CLI lists them too (a second process on the same database).
        env = {
            **os.environ,
            "WRENN_STATE_DIR": str(paths.state),
            "WRENN_CONFIG_DIR": str(paths.config),
        }
        out = subprocess.run(
            [str(Path(sys.executable).parent / "wrenn-tui"), "capsule", "list", "--json"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert {c["id"] for c in json.loads(out.stdout)} == {*BAD_ROWS, "cl-good00000001"}

        # Each bad one can be destroyed; the good one stays.
        for capsule_id in BAD_ROWS:
            await manager.destroy(capsule_id)
        assert [c.id for c in manager.list_capsules()] == ["cl-good00000001"]
    finally:
        await manager.close()
