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
    sandbox.files.write("/home/user/a", "x")
    assert sandbox.files.read("/home/user/a") == "x"
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
    error = expect_not_found(lambda: sandbox.files.read("/home/user/a"))
    expect_not_found(lambda: sandbox.commands.run("true"))
    assert sandbox.is_running() is False
    resumed = Sandbox.connect(sandbox.sandbox_id)
    step("connect")
    assert resumed.files.read("/home/user/a") == "x"
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
    await sandbox.files.write("/home/user/a", "x")
    assert await sandbox.files.read("/home/user/a") == "x"
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
        await sandbox.files.read("/home/user/a")
    except SandboxNotRunningException as exc:
        assert "was not found" in str(exc), exc
    else:
        raise AssertionError("an envd call on a paused sandbox succeeded")
    resumed = await AsyncSandbox.connect(sandbox.sandbox_id)
    step("connect")
    assert await resumed.files.read("/home/user/a") == "x"
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
    assert sandbox.commands.run("cat /home/user/marker").stdout == "before-pause\n"
    assert sandbox.kill() is True
    return {"sandbox_id": sandbox_id}


def sdk_error(call: Any) -> dict[str, Any]:
    """What the SDK raised for an API error: its type, HTTP status and message."""
    try:
        call()
    except Exception as exc:
        return {
            "type": type(exc).__name__,
            "status": getattr(exc, "status_code", None),
            "message": str(exc),
        }
    raise AssertionError("the call succeeded")


def run(sandbox: Sandbox, cmd: str) -> str:
    result = sandbox.commands.run(cmd, timeout=180)
    assert result.exit_code == 0, (cmd, result)
    return str(result.stdout)


def base_environment() -> dict[str, Any]:
    """E2B's `base`: the default user, its home, passwordless sudo and the tools."""
    sandbox = Sandbox.create()
    try:
        out = {
            "whoami": run(sandbox, "whoami").strip(),
            "id": run(sandbox, "id -u").strip(),
            "pwd": run(sandbox, "pwd").strip(),
            "home": run(sandbox, "echo $HOME").strip(),
            "sudo": run(sandbox, "sudo -n whoami").strip(),
            "root_run": sandbox.commands.run("whoami", user="root").stdout.strip(),
            # each its own command: under TCG pip alone takes seconds to import
            "tools": "".join(
                run(sandbox, cmd)
                for cmd in (
                    "git --version",
                    "curl --version | head -1",
                    "python3 -m pip --version",
                    # ensurepip is what python3-venv adds to Debian's python3
                    "python3 -c 'import ensurepip, venv; print(1)'",
                )
            ),
        }
        sandbox.files.write("/home/user/owned.txt", "x")
        info = sandbox.files.get_info("/home/user/owned.txt")
        out["owner"] = info.owner
        out["relative"] = sandbox.files.read("owned.txt")
        return out
    finally:
        sandbox.kill()


def snapshots_and_fork(name: str) -> dict[str, Any]:
    """Snapshot a sandbox with a file and a running server, start sandboxes from it and fork
    it, and every bad input the API refuses."""
    source = Sandbox.create()
    made: list[Sandbox] = []
    out: dict[str, Any] = {"source": source.sandbox_id}
    try:
        source.files.write("/home/user/state.txt", "before")
        source.commands.run(
            "python3 -m http.server 8123 --bind 127.0.0.1 --directory /home/user",
            background=True,
            timeout=0,  # the SDK's default (60 s) bounds the process, as in E2B
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                run(source, "curl -sf http://127.0.0.1:8123/state.txt")
                break
            except CommandExitException:
                assert time.monotonic() < deadline, "the server in the source never answered"
                time.sleep(0.5)
        snap = source.create_snapshot(name=name)
        step("snapshot")
        out["snapshot"] = {"id": snap.snapshot_id, "names": snap.names}
        out["listed"] = [s.snapshot_id for s in Sandbox.list_snapshots().next_items()]
        out["listed_source"] = [
            s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()
        ]
        out["listed_other"] = [
            s.snapshot_id for s in Sandbox.list_snapshots(name=name + "-none").next_items()
        ]
        out["duplicate"] = sdk_error(lambda: source.create_snapshot(name=name))
        out["bad_name"] = sdk_error(lambda: source.create_snapshot(name="Not A Name"))
        out["unknown_template"] = sdk_error(lambda: Sandbox.create("no-such-template-x"))

        clone = Sandbox.create(snap.snapshot_id)
        made.append(clone)
        step("create_from_snapshot")
        out["clone"] = {
            "id": clone.sandbox_id,
            "file": clone.files.read("/home/user/state.txt"),
            "server": run(clone, "curl -sf http://127.0.0.1:8123/state.txt"),
            "whoami": run(clone, "whoami").strip(),
            "template": Sandbox.get_info(clone.sandbox_id).template_id,
        }
        out["delete_in_use"] = sdk_error(lambda: Sandbox.delete_snapshot(snap.snapshot_id))
        out["delete_builtin"] = sdk_error(lambda: Sandbox.delete_snapshot("base"))

        forks = source.fork(count=2)
        step("fork_2")
        assert all(isinstance(f, Sandbox) for f in forks), forks
        made.extend(forks)
        forks[0].files.write("/home/user/state.txt", "changed in fork 0")
        out["forks"] = [
            {
                "id": f.sandbox_id,
                "file": f.files.read("/home/user/state.txt"),
                "server": run(f, "curl -sf http://127.0.0.1:8123/state.txt"),
                "token_differs": f._envd_access_token != source._envd_access_token,
                "random": run(f, "head -c 16 /dev/urandom | od -An -tx1").strip(),
            }
            for f in forks
        ]
        out["source_file"] = source.files.read("/home/user/state.txt")
        # the source's envd token does not open a fork
        sandbox_url = os.environ["E2B_SANDBOX_URL"]
        foreign = httpx.get(
            f"{sandbox_url}/files",
            params={"path": "/home/user/state.txt"},
            headers={
                "E2b-Sandbox-Id": forks[1].sandbox_id,
                "X-Access-Token": str(source._envd_access_token),
            },
            timeout=30,
        )
        out["foreign_token_status"] = foreign.status_code
        out["fork_unknown"] = sdk_error(lambda: Sandbox.fork("nosuchsandbox123"))
        out["fork_bad_count"] = httpx.post(
            f"{os.environ['E2B_API_URL']}/sandboxes/{source.sandbox_id}/fork",
            json={"count": 17},
            headers={"X-API-KEY": os.environ["E2B_API_KEY"]},
            timeout=30,
        ).json()
        for sandbox in made:
            sandbox.kill()
        made.clear()
        out["deleted"] = Sandbox.delete_snapshot(snap.snapshot_id)
        out["deleted_again"] = Sandbox.delete_snapshot(snap.snapshot_id)
        return out
    finally:
        for sandbox in made:
            with contextlib.suppress(Exception):
                sandbox.kill()
        with contextlib.suppress(Exception):
            Sandbox.delete_snapshot(name)
        source.kill()


def kill_during_run() -> dict[str, Any]:
    """A command's stream when its sandbox is killed under it: the SDK says the sandbox is
    gone (SandboxNotRunningException), not that the stream was cut short."""
    sandbox = Sandbox.create()
    handle = sandbox.commands.run("sleep 60", background=True, timeout=0)
    sandbox.kill()
    try:
        handle.wait()
    except Exception as exc:
        return {"error": type(exc).__name__, "message": str(exc)}
    raise AssertionError("wait() returned for a killed sandbox")


def signed_urls() -> dict[str, Any]:
    """download_url / upload_url of a secured sandbox: URLs that carry their own signature
    (no API key, no sandbox header) and expire when asked to."""
    sandbox = Sandbox.create(secure=True)
    try:
        sandbox.files.write("signed.txt", "signed content")
        url = sandbox.download_url("signed.txt", "user")
        got = httpx.get(url, timeout=30)
        expiring = httpx.get(
            sandbox.download_url("signed.txt", "user", use_signature_expiration=120), timeout=30
        )
        expired = httpx.get(
            sandbox.download_url("signed.txt", "user", use_signature_expiration=-120), timeout=30
        )
        tampered = httpx.get(url.replace("signed.txt", "other.txt"), timeout=30)
        upload = httpx.post(
            sandbox.upload_url("uploaded.txt", "user"),
            files={"file": ("uploaded.txt", b"via a signed url")},
            timeout=30,
        )
        return {
            "get": [got.status_code, got.text],
            "expiring": [expiring.status_code, expiring.text],
            "expired": [expired.status_code, expired.json()],
            "tampered": tampered.status_code,
            "upload": upload.status_code,
            "uploaded": sandbox.files.read("uploaded.txt"),
        }
    finally:
        sandbox.kill()


def pause_filesystem_only() -> dict[str, Any]:
    """pause(keep_memory=False): the disk is kept, the memory is not; connect() boots."""
    sandbox = Sandbox.create()
    try:
        sandbox.files.write("/home/user/fs-only.txt", "persisted")
        sandbox.commands.run("sleep 600", background=True, timeout=0)
        boot_before = sandbox.files.read("/proc/sys/kernel/random/boot_id").strip()
        paused = sandbox.pause(keep_memory=False)
        state = Sandbox.get_info(sandbox.sandbox_id).state.value
        resumed = sandbox.connect()
        return {
            "boot_id": boot_before,
            "paused": paused,
            "state": state,
            "same_id": resumed.sandbox_id == sandbox.sandbox_id,
            "marker": resumed.files.read("/home/user/fs-only.txt"),
            "boot_changed": resumed.files.read("/proc/sys/kernel/random/boot_id").strip()
            != boot_before,
            "sleepers": run(resumed, "pgrep -c -x sleep || true").strip(),
            "whoami": run(resumed, "whoami").strip(),
        }
    finally:
        sandbox.kill()


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
    elif scenario == "pause-filesystem-only":
        out = pause_filesystem_only()
    elif scenario == "signed-urls":
        out = signed_urls()
    elif scenario == "kill-during-run":
        out = kill_during_run()
    elif scenario == "base-environment":
        out = base_environment()
    elif scenario == "snapshots-and-fork":
        out = snapshots_and_fork(*args)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    print(json.dumps({"ok": True, "steps": steps, **out}), flush=True)
    # Skips interpreter finalization: the SDK's async HTTP client (pyqwest 0.12) aborts the
    # process at exit now and then, against any HTTP server (Python's own http.server too),
    # after the work is done. Failures above still exit non-zero with a traceback.
    os._exit(0)


if __name__ == "__main__":
    main()
