"""What only happens inside a capsule: kernel writes, and acting for other users as root."""

from __future__ import annotations

import os
import pwd
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from backend.envd.guest import GuestKernel
from backend.envd.paths import PathResolver
from backend.envd.spawn import Launcher
from backend.envd.state import RuntimeState
from backend.envd.users import Accounts

from .conftest import Envd, pty_socket


def test_guest_kernel_drops_only_the_page_cache(tmp_path: Path) -> None:
    (tmp_path / "sys" / "vm").mkdir(parents=True)
    (tmp_path / "sys" / "vm" / "drop_caches").write_text("")
    assert GuestKernel(host_mode=False, proc=tmp_path).drop_page_cache() is True
    assert (tmp_path / "sys" / "vm" / "drop_caches").read_text() == "1\n"
    assert GuestKernel(host_mode=True, proc=tmp_path / "absent").drop_page_cache() is False
    assert GuestKernel(host_mode=False, proc=tmp_path / "absent").drop_page_cache() is False


def test_guest_kernel_mixes_entropy_in(tmp_path: Path) -> None:
    sink = tmp_path / "urandom"
    sink.write_bytes(b"")
    # A regular file takes the write but not the ioctls; that is logged, not fatal.
    assert GuestKernel(host_mode=False, urandom=sink).add_entropy(b"\x01\x02") is True
    assert sink.read_bytes() == b"\x01\x02"
    assert GuestKernel(host_mode=True, urandom=sink).add_entropy(b"\x03") is False
    assert sink.read_bytes() == b"\x01\x02"


def test_guest_kernel_sets_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, float]] = []
    monkeypatch.setattr(time, "clock_settime", lambda clock, value: calls.append((clock, value)))
    assert GuestKernel(host_mode=False).set_clock(1_800_000_000.5) is True
    assert calls == [(time.CLOCK_REALTIME, 1_800_000_000.5)]
    assert GuestKernel(host_mode=True).set_clock(1.0) is False
    assert len(calls) == 1


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@needs_root
def test_launch_as_another_user_drops_privileges() -> None:
    accounts = Accounts(host_mode=False)
    launcher = Launcher(RuntimeState(), accounts, PathResolver(None))
    ctx = launcher.prepare(user="nobody", cwd="/", env={"A": "1"})
    nobody = pwd.getpwnam("nobody")
    kwargs = ctx.popen_kwargs()
    assert (kwargs["user"], kwargs["group"]) == (nobody.pw_uid, nobody.pw_gid)
    assert ctx.env["USER"] == "nobody" and ctx.env["HOME"] == nobody.pw_dir
    assert ctx.env["A"] == "1"
    root_ctx = launcher.prepare(user=None, cwd=None, env=None)
    assert "user" not in root_ctx.popen_kwargs()
    assert root_ctx.env["HOME"] == "/root"


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="envd-guest-"))
    path.chmod(0o777)
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@needs_root
async def test_guest_mode_acts_as_the_requested_user(
    envd_factory: Callable[..., Envd], shared_dir: Path
) -> None:
    # No --root: real paths, as in a capsule. Nothing here writes outside shared_dir, and the
    # threshold keeps the reclaimer off the host's page cache.
    envd = envd_factory("--reclaim-threshold", "100", guest_mode=True)
    nobody = pwd.getpwnam("nobody")
    secret = shared_dir / "root-only.txt"
    secret.write_text("secret")
    secret.chmod(0o600)
    with envd.client() as c:
        out = c.post("/exec", json={"cmd": "id -un; echo $HOME; pwd", "user": "nobody"}).json()
        assert out["stdout"].split() == ["nobody", nobody.pw_dir, "/"]
        assert c.post("/exec", json={"argv": ["id", "-un"]}).json()["stdout"] == "root\n"
        r = c.post("/exec", json={"argv": ["true"], "user": "no-such-user-here"})
        assert (r.status_code, r.json()["error"]) == (400, "unknown_user")

        r = c.post(
            "/files",
            params={"path": str(shared_dir / "mine.txt"), "username": "nobody"},
            files={"file": ("x", b"hello")},
        )
        assert r.status_code == 200
        st = (shared_dir / "mine.txt").stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid)
        umask = os.umask(0)
        os.umask(umask)
        assert stat.S_IMODE(st.st_mode) == 0o644 & ~umask  # envd inherited this umask

        r = c.get("/files", params={"path": str(secret), "username": "nobody"})
        assert (r.status_code, r.json()["error"]) == (403, "permission_denied")
        assert c.get("/files", params={"path": str(secret)}).content == b"secret"
        r = c.post(
            "/files",
            params={"path": str(secret), "username": "nobody"},
            files={"file": ("x", b"overwrite")},
        )
        assert r.status_code == 403
        assert secret.read_text() == "secret"

        assert c.post("/init", json={"defaultUser": "nobody"}).status_code == 200
        assert c.post("/exec", json={"argv": ["id", "-un"]}).json()["stdout"] == "nobody\n"
        r = c.post("/init", json={"defaultUser": "no-such-user-here"})
        assert (r.status_code, r.json()["error"]) == (400, "unknown_user")

    async with pty_socket(envd) as pty:
        await pty.send(type="start", user="root", cmd="/bin/sh", args=["-c", "id -un"])
        await pty.expect("started")
        await pty.expect("exit")
        assert "root" in pty.output
        pty.output = ""
        await pty.send(
            type="start",
            cmd="/bin/sh",
            args=["-c", "id -un; echo $TERM; echo direct > $(tty) && echo wrote-tty"],
        )
        await pty.expect("started")
        await pty.expect("exit")
        assert "nobody" in pty.output and "xterm-256color" in pty.output
        # The user owns its terminal, so it can open it by name.
        assert "wrote-tty" in pty.output
