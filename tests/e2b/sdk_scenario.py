"""What an agent does with the unmodified E2B SDK; run by the tests in the SDK's own venv.

``python sdk_scenario.py SCENARIO [ARGS]`` with E2B_API_KEY, E2B_API_URL and E2B_SANDBOX_URL
set. Prints one JSON object (the last line) on success; any failure is a traceback and a
non-zero exit. Only the SDK, httpx (its dependency) and the stdlib are importable here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from typing import Any

import httpx
from e2b import AsyncSandbox, Sandbox
from e2b.exceptions import AuthenticationException, SandboxNotRunningException
from e2b.sandbox.commands.command_handle import CommandExitException, PtySize

PTY_DEADLINE_S = 30
steps: dict[str, float] = {}
_last = time.monotonic()


def step(name: str) -> None:
    global _last
    now = time.monotonic()
    steps[name] = round(now - _last, 3)
    _last = now


def envd_pty_tags(sandbox_id: str, token: str | None) -> list[str]:
    """What the dashboard's PTY pane lists: envd's own ``GET /pty``, through the proxy."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "49983"}
    if token:
        headers["X-Access-Token"] = token
    response = httpx.get(f"{os.environ['E2B_SANDBOX_URL']}/pty", headers=headers, timeout=10)
    response.raise_for_status()
    return [s["tag"] for s in response.json() if s["alive"]]


def pty_tag(processes: list[Any], pid: int) -> str:
    tags = [p.tag for p in processes if p.pid == pid]
    assert tags and tags[0], f"pid {pid} not listed with a tag: {processes}"
    return str(tags[0])


def prompt_line(output: bytes, marker: bytes) -> bool:
    """The command's output, not the terminal echoing the typed command."""
    return marker + b"\r\n" in output.replace(b"echo " + marker, b"")


def expect_not_found(call: Any) -> str:
    try:
        call()
    except SandboxNotRunningException as exc:
        assert "was not found" in str(exc), exc
        return type(exc).__name__
    raise AssertionError("an envd call on a paused sandbox succeeded")


def lifecycle() -> dict[str, Any]:
    sandbox = Sandbox.create()
    step("create")
    result = sandbox.commands.run("echo hi")
    assert result.stdout == "hi\n", result
    step("run")
    sandbox.files.write("/root/a", "x")
    assert sandbox.files.read("/root/a") == "x"
    step("files")
    handle = sandbox.pty.create(PtySize(rows=24, cols=80), timeout=PTY_DEADLINE_S)
    sandbox.pty.send_stdin(handle.pid, b"echo pty-ok\n")
    output = b""
    for _, _, data in handle:
        output += data or b""
        if prompt_line(output, b"pty-ok"):
            break
    assert prompt_line(output, b"pty-ok"), output
    tag = pty_tag(sandbox.commands.list(), handle.pid)
    assert tag in envd_pty_tags(sandbox.sandbox_id, sandbox._envd_access_token), tag
    sandbox.pty.kill(handle.pid)
    with contextlib.suppress(CommandExitException):
        handle.wait()
    step("pty")
    info = sandbox.get_info()
    assert info.state.value == "running", info
    assert sandbox.sandbox_id in [s.sandbox_id for s in Sandbox.list().next_items()]
    assert sandbox.beta_pause() is True
    assert Sandbox.get_info(sandbox.sandbox_id).state.value == "paused"
    step("pause")
    error = expect_not_found(lambda: sandbox.files.read("/root/a"))
    expect_not_found(lambda: sandbox.commands.run("true"))
    assert sandbox.is_running() is False
    resumed = Sandbox.connect(sandbox.sandbox_id)
    step("connect")
    assert resumed.files.read("/root/a") == "x"
    assert resumed.commands.run("echo again").stdout == "again\n"
    step("after-resume")
    sandbox_id = resumed.sandbox_id
    assert resumed.kill() is True
    assert Sandbox.kill(sandbox_id) is False
    step("kill")
    return {"sandbox_id": sandbox_id, "pty_tag": tag, "paused_error": error}


async def lifecycle_async() -> dict[str, Any]:
    sandbox = await AsyncSandbox.create()
    step("create")
    result = await sandbox.commands.run("echo hi")
    assert result.stdout == "hi\n", result
    step("run")
    await sandbox.files.write("/root/a", "x")
    assert await sandbox.files.read("/root/a") == "x"
    step("files")
    chunks: list[bytes] = []
    handle = await sandbox.pty.create(
        PtySize(rows=24, cols=80), on_data=chunks.append, timeout=PTY_DEADLINE_S
    )
    await sandbox.pty.send_stdin(handle.pid, b"echo pty-ok\n")
    deadline = time.monotonic() + PTY_DEADLINE_S
    while not prompt_line(b"".join(chunks), b"pty-ok") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert prompt_line(b"".join(chunks), b"pty-ok"), b"".join(chunks)
    tag = pty_tag(await sandbox.commands.list(), handle.pid)
    assert tag in envd_pty_tags(sandbox.sandbox_id, sandbox._envd_access_token), tag
    await handle.kill()
    with contextlib.suppress(CommandExitException):
        await handle.wait()
    step("pty")
    assert await sandbox.beta_pause() is True
    step("pause")
    try:
        await sandbox.files.read("/root/a")
    except SandboxNotRunningException as exc:
        assert "was not found" in str(exc), exc
    else:
        raise AssertionError("an envd call on a paused sandbox succeeded")
    resumed = await AsyncSandbox.connect(sandbox.sandbox_id)
    step("connect")
    assert await resumed.files.read("/root/a") == "x"
    assert (await resumed.commands.run("echo again")).stdout == "again\n"
    step("after-resume")
    sandbox_id = resumed.sandbox_id
    assert await resumed.kill() is True
    step("kill")
    return {"sandbox_id": sandbox_id, "pty_tag": tag}


def wrong_key() -> dict[str, Any]:
    try:
        Sandbox.create(api_key="wrenn_not-the-key")
    except AuthenticationException as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    raise AssertionError("creating a sandbox with a wrong API key succeeded")


def drive_pty(sandbox_id: str, tag: str) -> dict[str, Any]:
    """Reach a terminal someone else started (the dashboard) by its tag, type into it."""
    sandbox = Sandbox.connect(sandbox_id)
    pid = [p.pid for p in sandbox.commands.list() if p.tag == tag]
    assert pid, f"{tag} not listed: {sandbox.commands.list()}"
    handle = sandbox.pty.connect(pid[0], timeout=PTY_DEADLINE_S)
    sandbox.pty.send_stdin(pid[0], b"echo from-sdk\n")
    output = b""
    for _, _, data in handle:
        output += data or b""
        if prompt_line(output, b"from-sdk"):
            break
    handle.disconnect()
    return {"pid": pid[0]}


def connect_run(sandbox_id: str) -> dict[str, Any]:
    """A sandbox someone else paused (the dashboard): connect() resumes it."""
    assert Sandbox.get_info(sandbox_id).state.value == "paused"
    sandbox = Sandbox.connect(sandbox_id)
    step("connect")
    assert sandbox.commands.run("cat /root/marker").stdout == "before-pause\n"
    assert sandbox.kill() is True
    return {"sandbox_id": sandbox_id}


def main() -> None:
    scenario, *args = sys.argv[1:]
    if scenario == "lifecycle":
        out = lifecycle()
    elif scenario == "lifecycle-async":
        out = asyncio.run(lifecycle_async())
    elif scenario == "wrong-key":
        out = wrong_key()
    elif scenario == "connect-run":
        out = connect_run(*args)
    elif scenario == "drive-pty":
        out = drive_pty(*args)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print(json.dumps({"ok": True, "steps": steps, **out}), flush=True)
    # Skips interpreter finalization: the SDK's async HTTP client (pyqwest 0.12) aborts the
    # process at exit now and then, against any HTTP server (Python's own http.server too),
    # after the work is done. Failures above still exit non-zero with a traceback.
    os._exit(0)


if __name__ == "__main__":
    main()
