"""What a Wrenn user does with the unmodified Wrenn SDK; run by the tests in the SDK's venv.

``python sdk_scenario.py SCENARIO [ARGS]`` with WRENN_API_KEY and WRENN_BASE_URL set. Prints
one JSON object (the last line) on success; any failure is a traceback and a non-zero exit.
Only the SDK, its dependencies (httpx, httpx-ws, pydantic) and the stdlib are importable.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
from wrenn import AsyncCapsule, Capsule, WrennClient
from wrenn.exceptions import (
    WrennAuthenticationError,
    WrennConflictError,
    WrennNotFoundError,
    WrennValidationError,
)

BIG_FILE_MB = 48
CHUNK = 1 << 20
steps: dict[str, float] = {}
_last = time.monotonic()


def step(name: str) -> None:
    global _last
    now = time.monotonic()
    steps[name] = round(now - _last, 3)
    _last = now


def expect(error: type[Exception], call: Callable[[], Any]) -> str:
    try:
        call()
    except error as exc:
        return str(exc)
    raise AssertionError(f"expected {error.__name__} from {call}")


async def aexpect(error: type[Exception], call: Callable[[], Any]) -> str:
    try:
        await call()
    except error as exc:
        return str(exc)
    raise AssertionError(f"expected {error.__name__}")


def chunks(total_mb: int) -> Iterator[bytes]:
    for i in range(total_mb):
        yield bytes([i % 251]) * CHUNK


def expected_digest(total_mb: int) -> str:
    digest = hashlib.sha256()
    for chunk in chunks(total_mb):
        digest.update(chunk)
    return digest.hexdigest()


class EventWatcher:
    """The SSE stream in a thread: every event seen, from the ``connected`` sentinel on."""

    def __init__(self) -> None:
        self.client = WrennClient()
        self.events: list[dict[str, Any]] = []
        self.connected = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.connected.wait(30), "the event stream did not say connected"

    def _run(self) -> None:
        try:
            for event in self.client.events.stream():
                if event.event == "connected":
                    self.connected.set()
                    continue
                self.events.append(
                    {"event": str(event.event), "id": event.resource.id if event.resource else None}
                )
        except Exception:
            pass

    def wait_for(self, kind: str, capsule_id: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if {"event": kind, "id": capsule_id} in self.events:
                return
            time.sleep(0.1)
        raise AssertionError(f"no {kind} event for {capsule_id}: {self.events}")

    def close(self) -> None:
        self.client.close()


def read_pty(term: Any, marker: bytes, deadline_s: float = 30) -> bytes:
    seen = b""
    deadline = time.monotonic() + deadline_s
    for event in term:
        if event.type == "output" and isinstance(event.data, bytes):
            seen += event.data
            # the command's output, not the terminal echoing what was typed
            if marker + b"\r\n" in seen.replace(b"echo " + marker, b""):
                return seen
        if event.type == "exit" or time.monotonic() > deadline:
            break
    raise AssertionError(f"{marker!r} not seen on the terminal: {seen[-500:]!r}")


# -- the sync client, every call --------------------------------------------------------------


def lifecycle() -> dict[str, Any]:
    out: dict[str, Any] = {}
    watcher = EventWatcher()
    step("start")
    capsule = Capsule.create(wait=True, timeout=0)
    step("create")
    cid = capsule.capsule_id
    out["capsule_id"] = cid
    assert capsule.is_running()
    info = capsule.get_info()
    assert info.status == "running" and info.vcpus and info.memory_mb, info
    assert info.disk_size_mb and info.disk_used_mb is not None, info
    assert any(c.id == cid for c in Capsule.list())
    watcher.wait_for("capsule.create", cid)

    # commands
    result = capsule.commands.run("echo hi")
    step("run_echo")
    assert (result.stdout, result.exit_code) == ("hi\n", 0), result
    result = capsule.commands.run("echo oops >&2; exit 3")
    assert (result.stderr, result.exit_code) == ("oops\n", 3), result
    result = capsule.commands.run("echo $GREETING; pwd", envs={"GREETING": "hey"}, cwd="/tmp")
    assert result.stdout == "hey\n/tmp\n", result
    result = capsule.commands.run("sleep 5", timeout=1)
    assert result.exit_code == 124, result
    handle = capsule.commands.run("sleep 300", background=True, tag="sleeper")
    assert handle.pid > 0 and handle.tag == "sleeper", handle
    listed = capsule.commands.list()
    assert any(p.pid == handle.pid and p.tag == "sleeper" for p in listed), listed
    capsule.commands.kill(handle.pid)
    time.sleep(0.5)
    assert all(p.pid != handle.pid for p in capsule.commands.list())
    expect(WrennNotFoundError, lambda: capsule.commands.kill(999999))
    counter = capsule.commands.run(
        "for i in 1 2 3; do echo line$i; sleep 0.5; done; exit 7", background=True
    )
    events = list(capsule.commands.connect(counter.pid))
    stdout = "".join(e.data for e in events if e.type == "stdout")
    assert stdout == "line1\nline2\nline3\n", [(e.type, getattr(e, "data", "")) for e in events]
    assert events[-1].type == "exit" and events[-1].exit_code == 7
    streamed = list(capsule.commands.stream("echo a; echo b >&2; exit 4"))
    kinds = [e.type for e in streamed]
    assert kinds[0] == "start" and kinds[-1] == "exit", kinds
    assert "".join(e.data for e in streamed if e.type == "stdout") == "a\n"
    assert "".join(e.data for e in streamed if e.type == "stderr") == "b\n"
    assert streamed[-1].exit_code == 4
    argv = list(capsule.commands.stream("echo", ["x", "y"]))
    assert "".join(e.data for e in argv if e.type == "stdout") == "x y\n"
    step("commands")

    # files
    capsule.files.write("/tmp/w/a.txt", "hello")
    assert capsule.files.read("/tmp/w/a.txt") == "hello"
    capsule.files.write("/tmp/w/b.bin", bytes(range(256)))
    assert capsule.files.read_bytes("/tmp/w/b.bin") == bytes(range(256))
    assert capsule.files.exists("/tmp/w/a.txt")
    assert not capsule.files.exists("/tmp/w/nope")
    entries = {e.name: e for e in capsule.files.list("/tmp/w")}
    assert set(entries) == {"a.txt", "b.bin"} and entries["a.txt"].size == 5, entries
    assert entries["a.txt"].type == "file" and entries["a.txt"].modified_at
    made = capsule.files.make_dir("/tmp/w/d/e")
    assert made.type == "directory" and made.path == "/tmp/w/d/e", made
    again = capsule.files.make_dir("/tmp/w/d/e")  # idempotent
    assert again.type == "directory"
    deep = {e.path for e in capsule.files.list("/tmp/w", depth=3)}
    assert "/tmp/w/d/e" in deep, deep
    capsule.files.remove("/tmp/w/d")
    assert not capsule.files.exists("/tmp/w/d")
    expect(WrennNotFoundError, lambda: capsule.files.read("/tmp/w/missing"))
    expect(WrennNotFoundError, lambda: capsule.files.remove("/tmp/w/missing"))
    expect(WrennNotFoundError, lambda: capsule.files.list("/tmp/w/missing"))
    step("files")
    capsule.files.upload_stream("/tmp/big.bin", chunks(BIG_FILE_MB))
    step("upload_stream")
    digest = hashlib.sha256()
    size = 0
    for chunk in capsule.files.download_stream("/tmp/big.bin"):
        digest.update(chunk)
        size += len(chunk)
    step("download_stream")
    assert size == BIG_FILE_MB * CHUNK, size
    assert digest.hexdigest() == expected_digest(BIG_FILE_MB)
    inside = capsule.commands.run("sha256sum /tmp/big.bin").stdout.split()[0]
    assert inside == digest.hexdigest()
    out["big_file_mb"] = BIG_FILE_MB

    # a program's port, through get_url's {port}-{id}.{host} (sent as the Host header: the
    # name need not resolve here)
    server = capsule.commands.run(
        "exec python3 -m http.server 8000 --bind 127.0.0.1 --directory /tmp/w", background=True
    )
    url = httpx.URL(capsule.get_url(8000))
    assert url.host == f"8000-{cid}.{httpx.URL(os.environ['WRENN_BASE_URL']).host}", url
    for _ in range(60):
        page = httpx.get(
            os.environ["WRENN_BASE_URL"] + "/a.txt",
            headers={"host": f"{url.host}:{url.port}"},
            timeout=30,
        )
        if page.status_code != 502:  # until the server listens
            break
        time.sleep(0.5)
    assert page.status_code == 200 and page.text == "hello", (page.status_code, page.text)
    capsule.commands.kill(server.pid)
    step("get_url")

    # terminals: one session, seen from a second connection by its tag
    with capsule.pty(cmd="/bin/sh", cols=100, rows=30) as term:
        first = next(iter(term))
        assert first.type == "started" and term.tag and term.pid, first
        term.write(b"echo pty-one\n")
        read_pty(term, b"pty-one")
        out["pty_tag"] = term.tag
        with capsule.pty_connect(term.tag) as again_term:
            started = next(iter(again_term))
            assert started.type == "started" and started.tag == term.tag, started
            again_term.write(b"echo pty-two\n")
            read_pty(again_term, b"pty-two")
    step("pty")

    # metrics from the sampler, team stats and usage
    time.sleep(2.5)
    with WrennClient() as client:
        metrics = client.capsules.metrics(cid, range="10m")
        assert metrics.points and metrics.points[-1].mem_bytes, metrics
        assert metrics.points[-1].disk_bytes, metrics.points[-1]
        stats = client.capsules.stats(range="5m")
        assert stats.current and stats.current.running_count >= 1, stats
        assert stats.series and stats.series.labels, stats
        usage = client.capsules.usage()
        assert usage.points is not None and len(usage.points) == 31, usage
        expect(WrennValidationError, lambda: client.capsules.metrics(cid, range="3d"))
        expect(WrennValidationError, lambda: client.capsules.usage(from_="yesterday"))
    capsule.ping()
    step("observe")

    # pause / resume and the illegal transitions
    capsule.commands.run("echo kept > /root/state.txt")
    paused = capsule.pause(wait=True)
    step("pause")
    assert paused.status == "paused"
    assert not capsule.is_running()
    out["run_paused"] = expect(WrennConflictError, lambda: capsule.commands.run("echo no"))
    out["pause_paused"] = expect(WrennConflictError, lambda: capsule.pause())
    watcher.wait_for("capsule.pause", cid)
    resumed = capsule.resume(wait=True)
    step("resume")
    assert resumed.status == "running"
    expect(WrennConflictError, lambda: capsule.resume())
    assert capsule.commands.run("cat /root/state.txt").stdout == "kept\n"
    watcher.wait_for("capsule.resume", cid)
    Capsule.pause(cid, wait=True)
    connected = Capsule.connect(cid)  # resumes a paused capsule
    assert connected.is_running()
    assert connected.commands.run("cat /root/state.txt").stdout == "kept\n"
    step("connect")

    # snapshots = templates
    name = f"sdk-snap-{cid[3:]}"
    template = capsule.create_snapshot(name)
    step("create_snapshot")
    assert template.name == name and template.type == "snapshot", template
    assert capsule.is_running()
    with WrennClient() as client:
        assert any(t.name == name for t in client.snapshots.list())
        assert all(t.type == "base" for t in client.snapshots.list(type="base"))
        out["snapshot_exists"] = expect(
            WrennConflictError, lambda: client.snapshots.create(cid, name)
        )
        child = Capsule.create(template=name, wait=True)
        step("create_from_snapshot")
        assert child.commands.run("cat /root/state.txt").stdout == "kept\n"
        assert child.get_info().template == name
        out["delete_in_use"] = expect(WrennConflictError, lambda: client.snapshots.delete(name))
        child.destroy(wait=True)
        replaced = client.snapshots.create(cid, name, overwrite=True)
        assert replaced.name == name
        client.snapshots.delete(name)
        assert all(t.name != name for t in client.snapshots.list())
        expect(WrennNotFoundError, lambda: client.snapshots.delete(name))
        expect(WrennValidationError, lambda: client.snapshots.create(cid, "Not A Name!"))
    step("snapshots")

    capsule.destroy(wait=True)
    step("destroy")
    expect(WrennNotFoundError, lambda: Capsule.get_info(cid))
    watcher.wait_for("capsule.destroy", cid)
    watcher.close()
    out["steps"] = steps
    return out


# -- the async client -------------------------------------------------------------------------


async def alist(iterator: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in iterator]


async def async_chunks(total_mb: int) -> AsyncIterator[bytes]:
    for chunk in chunks(total_mb):
        yield chunk


async def lifecycle_async() -> dict[str, Any]:
    out: dict[str, Any] = {}
    capsule = await AsyncCapsule.create(wait=True, timeout=30)
    cid = capsule.capsule_id
    out["capsule_id"] = cid
    assert await capsule.is_running()
    # Wrenn's inactivity TTL: below 60 s it is clamped up to 60
    assert (await capsule.get_info()).timeout_sec == 60
    result = await capsule.commands.run("echo hi")
    assert (result.stdout, result.exit_code) == ("hi\n", 0), result
    handle = await capsule.commands.run("echo bg; sleep 0.5", background=True)
    events = await alist(capsule.commands.connect(handle.pid))
    assert "".join(e.data for e in events if e.type == "stdout") == "bg\n"
    streamed = await alist(capsule.commands.stream("echo s"))
    assert streamed[-1].type == "exit" and streamed[-1].exit_code == 0
    assert await capsule.commands.list() is not None
    await capsule.files.write("/tmp/a.txt", "async")
    assert await capsule.files.read("/tmp/a.txt") == "async"
    assert await capsule.files.exists("/tmp/a.txt")
    assert (await capsule.files.make_dir("/tmp/d")).type == "directory"
    assert {e.name for e in await capsule.files.list("/tmp")} >= {"a.txt", "d"}
    await capsule.files.remove("/tmp/d")
    await capsule.files.upload_stream("/tmp/big.bin", async_chunks(8))
    size = 0
    async for chunk in capsule.files.download_stream("/tmp/big.bin"):
        size += len(chunk)
    assert size == 8 * CHUNK
    async with capsule.pty(cmd="/bin/sh") as term:
        await term.write(b"echo apty\n")
        seen = b""
        async for event in term:
            if event.type == "output" and isinstance(event.data, bytes):
                seen += event.data
                if b"apty\r\n" in seen.replace(b"echo apty", b""):
                    break
    await capsule.pause(wait=True)
    await aexpect(WrennConflictError, lambda: capsule.commands.run("echo no"))
    await aexpect(WrennConflictError, lambda: capsule.pause())
    await capsule.resume(wait=True)
    assert (await capsule.commands.run("echo back")).stdout == "back\n"
    await capsule.destroy(wait=True)
    await aexpect(WrennNotFoundError, lambda: AsyncCapsule.get_info(cid))
    return out


# -- errors -------------------------------------------------------------------------------------


def errors() -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["unknown"] = expect(WrennNotFoundError, lambda: Capsule.get_info("cl-000000000000"))
    out["connect_unknown"] = expect(WrennNotFoundError, lambda: Capsule.connect("cl-nope"))
    out["destroy_unknown"] = expect(WrennNotFoundError, lambda: Capsule.destroy("cl-nope"))
    out["unknown_template"] = expect(
        WrennNotFoundError, lambda: Capsule.create(template="no-such-template")
    )
    out["bad_vcpus"] = expect(WrennValidationError, lambda: Capsule.create(vcpus=0))
    with WrennClient(api_key="wrenn_wrong") as client:
        out["wrong_key"] = expect(WrennAuthenticationError, client.capsules.list)
    out["wrong_key_capsule"] = expect(
        WrennAuthenticationError, lambda: Capsule.list(api_key="wrenn_wrong")
    )
    return out


def observe_paused(capsule_id: str) -> dict[str, Any]:
    """A capsule someone else (the dashboard) paused reads as paused here."""
    info = Capsule.get_info(capsule_id)
    return {"status": str(info.status)}


def pty_connect(capsule_id: str, tag: str) -> dict[str, Any]:
    """Attach to a terminal someone else (the dashboard) started, by its tag."""
    capsule = Capsule.connect(capsule_id)
    with capsule.pty_connect(tag) as term:
        started = next(iter(term))
        assert started.type == "started" and started.tag == tag, started
        term.write(b"echo from-sdk\n")
        seen = read_pty(term, b"from-sdk")
    return {"tag": tag, "seen": seen.decode(errors="replace")}


def main() -> None:
    scenario, *args = sys.argv[1:]
    if scenario == "lifecycle":
        out = lifecycle()
    elif scenario == "lifecycle-async":
        out = asyncio.run(lifecycle_async())
    elif scenario == "errors":
        out = errors()
    elif scenario == "pty-connect":
        out = pty_connect(args[0], args[1])
    elif scenario == "status":
        out = observe_paused(args[0])
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    assert os.environ.get("WRENN_BASE_URL")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
