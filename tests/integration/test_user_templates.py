"""Saved templates and forks on real capsules: what a capsule held (files, a listening server, a
value in a process's memory) is in every copy; each copy is its own capsule (id, token, random);
the source is untouched; bad input changes nothing."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from backend.capsules.errors import CapsuleError, CapsuleNotFound
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from backend.capsules.templates import TemplateInUse
from backend.config import Paths
from tests.integration.conftest import sh

pytestmark = pytest.mark.vm

# A server holding a random value only in its memory (never written anywhere) and a file.
SERVE_SECRET = (
    "echo kept > /root/kept.txt; "
    "nohup python3 -c '"
    "import http.server, os\n"
    "value = os.urandom(8).hex().encode()\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(value)\n"
    "    def log_message(self, *a): pass\n"
    'http.server.HTTPServer(("127.0.0.1", 8123), H).serve_forever()\n'
    "' >/dev/null 2>&1 & "
    "for i in $(seq 50); do "
    'python3 -c \'import urllib.request as u; print(u.urlopen("http://127.0.0.1:8123/").read()'
    ".decode())' 2>/dev/null && exit 0; sleep 0.2; done; exit 1"
)
ASK_SECRET = (
    "cat /root/kept.txt; "
    'python3 -c \'import urllib.request as u; print(u.urlopen("http://127.0.0.1:8123/").read()'
    ".decode())'"
)
IDENTITY = (
    "cat /run/wrenn/.WRENN_SANDBOX_ID; echo; cat /proc/sys/kernel/random/uuid; "
    "python3 -c 'import os; print(os.urandom(16).hex())'"
)


async def _refused(clone: Capsule, token: str) -> None:
    async with httpx.AsyncClient(trust_env=False) as client:
        r = await client.get(f"{clone.envd_url}/metrics", headers={"X-Access-Token": token})
        assert r.status_code == 401, f"{clone.id} answered another capsule's token: {r.status_code}"


async def _distinct(manager: CapsuleManager, capsules: list[Capsule]) -> None:
    assert len({c.id for c in capsules}) == len(capsules)
    assert len({c.access_token for c in capsules}) == len(capsules)
    outs = await asyncio.gather(*(sh(manager, c.id, IDENTITY) for c in capsules))
    seen: set[str] = set()
    for capsule, out in zip(capsules, outs, strict=True):
        lines = out.split()
        assert lines[0] == capsule.id
        assert not seen & set(lines[1:]), "two copies produced the same random values"
        seen |= set(lines[1:])


async def test_template_from_running_capsule(manager: CapsuleManager) -> None:
    source = await manager.create()
    secret = (await sh(manager, source.id, SERVE_SECRET)).strip()
    template = await manager.template_create(source.id, "web.v1")
    assert template.name == "web.v1" and not template.builtin and template.source == source.id
    assert (template.memory_mib, template.vcpus, template.network) == (256, 1, "none")
    # the source ran on: same state, same server, writes go on
    assert manager.get(source.id).state == State.RUNNING
    assert (await sh(manager, source.id, ASK_SECRET)).split() == ["kept", secret]
    await sh(manager, source.id, "echo after > /root/after.txt")
    assert "web.v1" in [t.name for t in manager.list_templates()]

    clone = await manager.create(template="web.v1")
    assert clone.template == "web.v1" and clone.extra["start"] == "warm"
    assert (await sh(manager, clone.id, ASK_SECRET)).split() == ["kept", secret]
    assert (await sh(manager, clone.id, "cat /run/wrenn/.WRENN_TEMPLATE_ID")).strip() == "web.v1"
    assert (await sh(manager, clone.id, "test -e /root/after.txt || echo absent")).strip() == (
        "absent"
    )
    await _distinct(manager, [source, clone])
    await _refused(clone, source.access_token)
    # the clone's disk is an overlay on the template's disk: its own bytes are few
    assert manager.layout.disk(clone.id).stat().st_blocks * 512 < 16 << 20

    # in use: refused, with the capsule named; nothing removed
    with pytest.raises(TemplateInUse) as refused:
        await manager.template_remove("web.v1")
    assert clone.id in str(refused.value)
    assert (await sh(manager, clone.id, "cat /root/kept.txt")).strip() == "kept"
    # a template made from a capsule made from a template has a one-link backing chain
    second = await manager.template_create(clone.id, "web.v2")
    from backend.capsules.disks import backing_chain

    chain = await backing_chain(Path(second.path) / "disk.qcow2")
    assert len(chain) == 2, chain  # the flattened disk and the image's rootfs
    # and it holds what the clone inherited from web.v1 (in web.v1's layer only: the clone
    # never wrote it), not only what the clone wrote itself
    grandchild = await manager.create(template="web.v2")
    assert (await sh(manager, grandchild.id, "cat /root/kept.txt")).strip() == "kept"
    await manager.destroy(grandchild.id)

    await manager.destroy(clone.id)
    await manager.template_remove("web.v1")
    assert "web.v1" not in [t.name for t in manager.list_templates()]
    assert not manager.layout.template("web.v1").exists()
    with pytest.raises(CapsuleNotFound):
        await manager.create(template="web.v1")


async def test_fork_running_capsule(manager: CapsuleManager) -> None:
    source = await manager.create()
    secret = (await sh(manager, source.id, SERVE_SECRET)).strip()
    clones = await manager.fork(source.id, count=2)
    assert len(clones) == 2
    assert manager.get(source.id).state == State.RUNNING
    for clone in clones:
        assert clone.state == State.RUNNING and clone.extra.get("fork_of") == source.id
        assert (await sh(manager, clone.id, ASK_SECRET)).split() == ["kept", secret]
        await _refused(clone, source.access_token)
    await _distinct(manager, [source, *clones])
    # copies, not shared: a write in one is not in the others
    await sh(manager, clones[0].id, "echo mine > /root/kept.txt")
    assert (await sh(manager, source.id, "cat /root/kept.txt")).strip() == "kept"
    assert (await sh(manager, clones[1].id, "cat /root/kept.txt")).strip() == "kept"


async def test_template_and_fork_of_paused_capsule(manager: CapsuleManager) -> None:
    source = await manager.create()
    await sh(manager, source.id, "echo paused-state > /root/p.txt")
    await manager.pause(source.id)
    template = await manager.template_create(source.id, "from-paused")
    assert manager.get(source.id).state == State.PAUSED
    [forked] = await manager.fork(source.id)
    assert manager.get(source.id).state == State.PAUSED
    made = await manager.create(template=template.name)
    for c in (forked, made):
        assert (await sh(manager, c.id, "cat /root/p.txt")).strip() == "paused-state"
    await manager.resume(source.id)
    assert (await sh(manager, source.id, "cat /root/p.txt")).strip() == "paused-state"


async def test_fork_and_template_of_a_paused_capsule_verify_the_generation_they_copy(
    manager: CapsuleManager,
) -> None:
    """A running source's fork restores a capture it made moments before, unchecksummed (it
    never leaves the agent's private work dir); a paused source's fork copies a stored
    generation, and that is still verified: a corrupt one is a clear error, nothing starts."""
    source = await manager.create()
    snap = await manager.pause(source.id)
    state = Path(snap.path) / "vmstate"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.chmod(0o600)
    state.write_bytes(bytes(data))
    with pytest.raises(CapsuleError, match="corrupt \\(checksum mismatch\\)"):
        await manager.fork(source.id)
    # a template would keep the corruption for good: it is refused the same way
    with pytest.raises(CapsuleError, match="corrupt \\(checksum mismatch\\)"):
        await manager.template_create(source.id, "from-corrupt")
    assert "from-corrupt" not in [t.name for t in manager.list_templates()]
    assert [c.id for c in manager.list_capsules()] == [source.id]
    assert manager.get(source.id).state == State.PAUSED


async def test_bad_input_changes_nothing(manager: CapsuleManager) -> None:
    source = await manager.create()
    before = manager.get(source.id)
    for name in ("", "Upper", "../x", "a/b", "-lead", "x" * 64, "sp ace"):
        with pytest.raises(CapsuleError, match="invalid template name"):
            await manager.template_create(source.id, name)
    for count in (0, 17, -1):
        with pytest.raises(CapsuleError, match=r"1\.\.16"):
            await manager.fork(source.id, count)
    with pytest.raises(CapsuleNotFound):
        await manager.template_create("cl-doesnotexist", "fine")
    with pytest.raises(CapsuleNotFound):
        await manager.fork("cl-doesnotexist")
    with pytest.raises(CapsuleNotFound):
        await manager.create(template="no-such-template")
    with pytest.raises(CapsuleNotFound):
        await manager.template_remove("no-such-template")
    with pytest.raises(CapsuleError, match="built-in"):
        await manager.template_remove("default")
    with pytest.raises(CapsuleError, match="exists already"):
        await manager.template_create(source.id, "default")

    await manager.template_create(source.id, "once")
    with pytest.raises(CapsuleError, match="exists already"):
        await manager.template_create(source.id, "once")
    with pytest.raises(CapsuleError, match="memory"):
        await manager.create(template="once", memory_mib=512)
    with pytest.raises(CapsuleError, match="cold"):
        await manager.create(template="once", cold=True)

    # a capsule in error is neither saved nor forked
    broken = manager.save(manager.get(source.id).with_(state=State.ERROR, reason="test"))
    with pytest.raises(CapsuleError, match="error"):
        await manager.template_create(broken.id, "never")
    with pytest.raises(CapsuleError, match="error"):
        await manager.fork(broken.id)
    manager.save(broken.with_(state=State.RUNNING, reason=""))
    assert manager.get(source.id).state == before.state
    assert sorted(t.name for t in manager.list_templates() if not t.builtin) == ["once"]
    assert [c.id for c in manager.list_capsules()] == [source.id]
    assert list(manager.layout.work.iterdir()) == []
    assert (await sh(manager, source.id, "echo alive")).strip() == "alive"


async def test_full_disk_during_template_create_leaves_source_running(
    manager: CapsuleManager, tiny_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = await manager.create()
    await sh(manager, source.id, "echo before > /root/b.txt")
    monkeypatch.setattr(type(manager.layout), "work", property(lambda self: tiny_fs / "work"))
    with pytest.raises(CapsuleError) as failed:
        await manager.template_create(source.id, "nospace")
    assert "nospace" in str(failed.value)
    monkeypatch.undo()
    assert manager.get(source.id).state == State.RUNNING
    assert manager.templates.user("nospace") is None
    assert not manager.layout.template("nospace").exists()
    assert (await sh(manager, source.id, "cat /root/b.txt")).strip() == "before"
    assert list((tiny_fs / "work").iterdir()) == []


def _agent(paths: Paths, *args: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "WRENN_DATA_DIR": str(paths.data),
        "WRENN_STATE_DIR": str(paths.state),
        "WRENN_CONFIG_DIR": str(paths.config),
        "WRENN_CACHE_DIR": str(paths.cache),
        "WRENN_SHM_DIR": str(paths.shm),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "backend.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.mark.parametrize("what", ["template", "fork"])
async def test_agent_killed_mid_copy_leaves_source_usable(
    manager: CapsuleManager, paths: Paths, what: str
) -> None:
    source = await manager.create()
    await sh(manager, source.id, "echo survive > /root/s.txt")
    args = (
        ["template", "create", source.id, "--name", "halfway"]
        if what == "template"
        else ["capsule", "fork", source.id, "--count", "2"]
    )
    agent = _agent(paths, *args)
    # kill it once it is copying (its work dir exists), before it can finish
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        work = manager.layout.work
        if work.is_dir() and any(work.iterdir()):
            break
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        await asyncio.sleep(0.02)
    else:
        pytest.fail("the agent never started copying")
    await asyncio.sleep(0.3)
    agent.send_signal(signal.SIGKILL)
    agent.wait()

    restarted = CapsuleManager(paths)
    try:
        await restarted.start(watchdog=False)
        assert restarted.get(source.id).state == State.RUNNING
        assert (await sh(restarted, source.id, "cat /root/s.txt")).strip() == "survive"
        assert restarted.templates.user("halfway") is None
        assert [c.id for c in restarted.list_capsules()] == [source.id]
        assert list(restarted.layout.work.iterdir()) == []
        # and it can be copied again
        [again] = await restarted.fork(source.id)
        assert (await sh(restarted, again.id, "cat /root/s.txt")).strip() == "survive"
    finally:
        await restarted.close()
