"""Issue 16 items 13-15: bad input to envd is a 4xx, never a 500 (long paths, Unicode digits,
deeply nested JSON); host-mode envd says nothing about what a symlink out of its root points
at; the state database's WAL files are private."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from backend.capsules.store import Store
from tests.e2b.conftest import start_host_envd
from tests.hostenvd import HostEnvd

CONNECT = {"Content-Type": "application/json", "Connect-Protocol-Version": "1"}
NESTED = b"[" * 200_000 + b"]" * 200_000
LONG = "/" + "a" * 5000


@pytest.fixture
def envd(tmp_path: Path) -> Iterator[HostEnvd]:
    instance = start_host_envd(tmp_path / "root")
    try:
        yield instance
    finally:
        instance.stop()
        assert "Traceback" not in instance.log(), instance.log()


def test_bad_input_is_a_4xx(envd: HostEnvd) -> None:
    with httpx.Client(base_url=envd.url, timeout=30) as c:
        pid = c.post("/processes", json={"cmd": "sleep 30"}).json()["pid"]
        answers = {
            "long path": c.get("/files", params={"path": LONG}),
            "long component": c.get("/files", params={"path": "/x/" + "b" * 300}),
            "long upload path": c.post(
                "/files",
                params={"path": LONG},
                content=b"x",
                headers={"Content-Type": "application/octet-stream"},
            ),
            "pid ²": c.get("/processes/²"),
            "pid ² events": c.get("/processes/²/events"),
            "signal ²": c.post(f"/processes/{pid}/signal", json={"signal": "²"}),
            "nested /exec": c.post("/exec", content=NESTED),
            "nested /init": c.post("/init", content=NESTED),
            "nested /processes": c.post("/processes", content=NESTED),
            "Connect long path": c.post(
                "/filesystem.Filesystem/Stat", json={"path": LONG}, headers=CONNECT
            ),
            "Connect depth ²": c.post(
                "/filesystem.Filesystem/ListDir", json={"path": "/", "depth": "²"}, headers=CONNECT
            ),
            "Connect pid ²": c.post(
                "/process.Process/SendSignal",
                json={"process": {"pid": "²"}, "signal": "SIGNAL_SIGKILL"},
                headers=CONNECT,
            ),
            "Connect nested": c.post(
                "/filesystem.Filesystem/ListDir", content=NESTED, headers=CONNECT
            ),
        }
        wrong = {k: (r.status_code, r.text[:200]) for k, r in answers.items()}
        wrong = {k: v for k, v in wrong.items() if not 400 <= v[0] < 500}
        assert wrong == {}
        assert answers["long path"].json()["error"] == "name_too_long"
        # envd is still fine.
        assert c.post("/exec", json={"cmd": "echo ok"}).json()["stdout"] == "ok\n"


def test_host_mode_says_nothing_of_symlink_targets_outside_the_root(
    envd: HostEnvd, tmp_path: Path
) -> None:
    secret = tmp_path / "outside-secret.bin"
    secret.write_bytes(b"s" * 12345)
    os.chown(secret, 4242, 4242)
    (envd.root / "escape").symlink_to(secret)
    inside = envd.root / "inside.txt"
    inside.write_bytes(b"i" * 77)
    (envd.root / "fine").symlink_to(inside)
    with httpx.Client(base_url=envd.url, timeout=30) as c:
        stat_answer = c.post(
            "/filesystem.Filesystem/Stat", json={"path": "/escape"}, headers=CONNECT
        )
        assert stat_answer.status_code == 200, stat_answer.text
        listed = c.post("/filesystem.Filesystem/ListDir", json={"path": "/"}, headers=CONNECT)
        assert listed.status_code == 200, listed.text
    entries = {e["name"]: e for e in listed.json()["entries"]}
    for entry in (stat_answer.json()["entry"], entries["escape"]):
        text = str(entry)
        assert "12345" not in text and "4242" not in text, entry
        assert str(tmp_path) not in text and "outside-secret" not in text, entry
        assert entry["type"] == "FILE_TYPE_SYMLINK" and entry["isSymlink"] is True
    # A link inside the root is still described by its target.
    assert entries["fine"]["size"] == "77" and entries["fine"]["symlinkTarget"] == "/inside.txt"


def test_state_database_files_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        store = Store(tmp_path / "state.db")
        store.add_event("cl-x", "test", "a write makes the WAL")
        files = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
        store.close()
    finally:
        os.umask(old)
    assert {"state.db", "state.db-wal", "state.db-shm"} <= set(files), files
    assert all(mode == 0o600 for mode in files.values()), {k: oct(v) for k, v in files.items()}
