"""envd's Connect façade on the wire (JSON codec, HTTP/1.1), against a real envd on the host:
framing and errors, process and PTY semantics shared with envd's own API, the filesystem."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.hostenvd import HostEnvd

from .conftest import start_host_envd

STREAM = "application/connect+json"


def envelope(message: dict[str, Any], flags: int = 0) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", flags, len(payload)) + payload


def frames(body: bytes) -> list[tuple[int, dict[str, Any]]]:
    out = []
    while body:
        flags, length = struct.unpack(">BI", body[:5])
        out.append((flags, json.loads(body[5 : 5 + length])))
        body = body[5 + length :]
    return out


def unary(envd: HostEnvd, method: str, message: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{envd.url}/{method}",
        content=json.dumps(message),
        headers={"Content-Type": "application/json", **headers},
        timeout=30,
    )


def stream(
    envd: HostEnvd, method: str, message: dict[str, Any], **headers: str
) -> list[tuple[int, dict[str, Any]]]:
    response = httpx.post(
        f"{envd.url}/{method}",
        content=envelope(message),
        headers={"Content-Type": STREAM, **headers},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == STREAM
    return frames(response.content)


def events(frames_: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
    """The ProcessEvents, after checking the stream ended cleanly."""
    *messages, (flags, end) = frames_
    assert flags == 0x02 and end == {}, end
    assert all(flags == 0 for flags, _ in messages)
    return [m["event"] for _, m in messages]


def output(evs: list[dict[str, Any]], stream_name: str) -> bytes:
    return b"".join(
        base64.b64decode(e["data"][stream_name]) for e in evs if stream_name in e.get("data", {})
    )


def pty_output(body: bytes) -> bytes:
    """Terminal bytes in the complete envelopes received so far."""
    out = b""
    while len(body) >= 5 and len(body) >= 5 + struct.unpack(">I", body[1:5])[0]:
        length = struct.unpack(">I", body[1:5])[0]
        message = json.loads(body[5 : 5 + length])
        out += base64.b64decode(message.get("event", {}).get("data", {}).get("pty", ""))
        body = body[5 + length :]
    return out


def shell(cmd: str) -> dict[str, Any]:
    return {"process": {"cmd": "/bin/bash", "args": ["-l", "-c", cmd]}, "stdin": False}


# -- framing and errors -------------------------------------------------------------------------


def test_a_command_streams_start_data_end(host_envd: HostEnvd) -> None:
    evs = events(stream(host_envd, "process.Process/Start", shell("echo out; echo err >&2")))
    assert list(evs[0]) == ["start"] and evs[0]["start"]["pid"] > 0
    assert output(evs, "stdout") == b"out\n"
    assert output(evs, "stderr") == b"err\n"
    assert evs[-1] == {"end": {"exitCode": 0, "exited": True, "status": "exit status 0"}}


def test_exit_codes_read_like_gos(host_envd: HostEnvd) -> None:
    failed = events(stream(host_envd, "process.Process/Start", shell("exit 3")))
    assert failed[-1]["end"] == {"exitCode": 3, "exited": True, "status": "exit status 3"}
    killed = events(stream(host_envd, "process.Process/Start", shell("kill -9 $$")))
    assert killed[-1]["end"] == {"exitCode": -1, "exited": False, "status": "signal: killed"}


def test_errors_are_connect_errors(host_envd: HostEnvd) -> None:
    missing = unary(host_envd, "filesystem.Filesystem/Stat", {"path": "/nope"})
    assert missing.status_code == 404
    assert missing.json()["code"] == "not_found"
    bad = httpx.post(
        f"{host_envd.url}/filesystem.Filesystem/Stat",
        content=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_argument"
    unknown = unary(host_envd, "process.Process/Fork", {})
    assert unknown.status_code == 501 and unknown.json()["code"] == "unimplemented"
    proto = httpx.post(
        f"{host_envd.url}/filesystem.Filesystem/Stat",
        content=b"",
        headers={"Content-Type": "application/proto"},
    )
    assert proto.json()["code"] == "unimplemented"
    # A stream fails inside the stream: HTTP 200, then an end-stream error.
    [(flags, end)] = stream(host_envd, "process.Process/Connect", {"process": {"pid": 999999}})
    assert flags == 0x02 and end["error"]["code"] == "not_found"
    [(flags, end)] = stream(host_envd, "process.Process/Start", {"process": {"cmd": ""}})
    assert flags == 0x02 and end["error"]["code"] == "invalid_argument"


def test_the_access_token_guards_rpc_too(tmp_path: Path) -> None:
    envd = start_host_envd(tmp_path / "root")
    try:
        httpx.post(f"{envd.url}/init", json={"accessToken": "s3cret"}).raise_for_status()
        denied = unary(envd, "process.Process/List", {})
        assert denied.status_code == 401
        allowed = unary(envd, "process.Process/List", {}, **{"X-Access-Token": "s3cret"})
        assert allowed.status_code == 200
    finally:
        envd.stop()


def test_keepalives_while_idle_and_the_deadline_kills(host_envd: HostEnvd) -> None:
    evs = events(
        stream(
            host_envd,
            "process.Process/Start",
            {**shell("sleep 1.3; echo done"), "tag": "slow-one"},
            **{"Keepalive-Ping-Interval": "1"},
        )
    )
    assert {"keepalive": {}} in evs
    assert output(evs, "stdout") == b"done\n"

    started = time.monotonic()
    *_, (flags, end) = stream(
        host_envd,
        "process.Process/Start",
        {**shell("sleep 30"), "tag": "bounded"},
        **{"Connect-Timeout-Ms": "400"},
    )
    assert flags == 0x02 and end["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - started < 5
    # E2B bounds the process by the request's timeout, not only the stream.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        info = httpx.get(f"{host_envd.url}/processes/bounded").json()
        if not info["alive"]:
            break
        time.sleep(0.05)
    assert info["signal"] == "SIGKILL"


def test_stdin_by_unary_and_by_client_stream(host_envd: HostEnvd) -> None:
    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=host_envd.url, timeout=30) as client:
            request = {"process": {"cmd": "cat"}, "stdin": True, "tag": "cat-1"}
            async with client.stream(
                "POST",
                "/process.Process/Start",
                content=envelope(request),
                headers={"Content-Type": STREAM},
            ) as response:
                body = b""
                chunks = response.aiter_raw()
                while len(body) < 5 or len(body) < 5 + struct.unpack(">I", body[1:5])[0]:
                    body += await anext(chunks)
                selector = {"tag": "cat-1"}
                sent = await client.post(
                    "/process.Process/SendInput",
                    json={
                        "process": selector,
                        "input": {"stdin": base64.b64encode(b"a\n").decode()},
                    },
                )
                assert sent.status_code == 200, sent.text
                streamed = await client.post(
                    "/process.Process/StreamInput",
                    content=envelope({"start": {"process": selector}})
                    + envelope({"data": {"input": {"stdin": base64.b64encode(b"b\n").decode()}}})
                    + envelope({"keepalive": {}}),
                    headers={"Content-Type": STREAM},
                )
                assert frames(streamed.content) == [(0, {}), (2, {})]
                closed = await client.post(
                    "/process.Process/CloseStdin", json={"process": selector}
                )
                assert closed.status_code == 200
                async for chunk in chunks:
                    body += chunk
                return events(frames(body))

    evs = asyncio.run(run())
    assert output(evs, "stdout") == b"a\nb\n"
    assert evs[-1]["end"]["exitCode"] == 0


def test_signals_and_gone_processes(host_envd: HostEnvd) -> None:
    started = httpx.post(
        f"{host_envd.url}/processes", json={"cmd": "sleep 30", "tag": "sleeper"}
    ).json()
    listed = unary(host_envd, "process.Process/List", {}).json()["processes"]
    mine = [p for p in listed if p["tag"] == "sleeper"]
    assert mine and mine[0]["pid"] == started["pid"] and mine[0]["config"]["cwd"]
    signal = {"process": {"pid": started["pid"]}, "signal": "SIGNAL_SIGTERM"}
    assert unary(host_envd, "process.Process/SendSignal", signal).status_code == 200
    deadline = time.monotonic() + 10
    while httpx.get(f"{host_envd.url}/processes/sleeper").json()["alive"]:
        assert time.monotonic() < deadline, "SIGTERM did not end sleep"
        time.sleep(0.05)
    # E2B forgets exited processes: the SDK's kill() then returns False on not_found.
    again = unary(host_envd, "process.Process/SendSignal", signal)
    assert again.status_code == 404 and again.json()["code"] == "not_found"
    assert all(
        p["tag"] != "sleeper"
        for p in unary(host_envd, "process.Process/List", {}).json()["processes"]
    )
    unspecified = unary(
        host_envd, "process.Process/SendSignal", {"process": {"tag": "x"}, "signal": 0}
    )
    assert unspecified.json()["code"] == "not_found"


# -- one PTY manager, two façades -----------------------------------------------------------------


def test_an_sdk_terminal_is_a_dashboard_session_and_back(host_envd: HostEnvd) -> None:
    async def run() -> None:
        async with httpx.AsyncClient(base_url=host_envd.url, timeout=30) as client:
            request = {
                "process": {"cmd": "/bin/bash", "args": ["-i", "-l"], "envs": {"TERM": "xterm"}},
                "pty": {"size": {"cols": 100, "rows": 30}},
                "tag": "sdk-term",
            }
            async with client.stream(
                "POST",
                "/process.Process/Start",
                content=envelope(request),
                headers={"Content-Type": STREAM},
            ) as response:
                chunks = response.aiter_raw()
                await anext(chunks)
                sessions = (await client.get("/pty")).json()
                mine = [s for s in sessions if s["tag"] == "sdk-term"]
                assert mine and (mine[0]["cols"], mine[0]["rows"]) == (100, 30)
                # The dashboard attaches by tag and types; the SDK's stream sees it.
                async with connect(host_envd.url.replace("http", "ws") + "/pty") as ws:
                    await ws.send(json.dumps({"type": "connect", "tag": "sdk-term"}))
                    assert json.loads(await ws.recv())["type"] == "connected"
                    await ws.send(json.dumps({"type": "input", "data": "echo from-dash\n"}))
                    body = b""
                    while b"from-dash\r\n" not in pty_output(body).replace(b"echo from-dash", b""):
                        body += await asyncio.wait_for(anext(chunks), 10)
                resized = await client.post(
                    "/process.Process/Update",
                    json={
                        "process": {"tag": "sdk-term"},
                        "pty": {"size": {"cols": 90, "rows": 20}},
                    },
                )
                assert resized.status_code == 200
                info = [s for s in (await client.get("/pty")).json() if s["tag"] == "sdk-term"]
                assert (info[0]["cols"], info[0]["rows"]) == (90, 20)
                not_a_pipe = await client.post(
                    "/process.Process/SendInput",
                    json={"process": {"tag": "sdk-term"}, "input": {"stdin": "eA=="}},
                )
                assert not_a_pipe.json()["code"] == "failed_precondition"
                kill = {"process": {"tag": "sdk-term"}, "signal": "SIGNAL_SIGKILL"}
                assert (
                    await client.post("/process.Process/SendSignal", json=kill)
                ).status_code == 200

            # And the other way: a dashboard session is listed for the SDK, by pid and tag.
            async with connect(host_envd.url.replace("http", "ws") + "/pty") as ws:
                await ws.send(json.dumps({"type": "start", "tag": "dash-term"}))
                started = json.loads(await ws.recv())
                listed = (await client.post("/process.Process/List", json={})).json()
                mine = [p for p in listed["processes"] if p["tag"] == "dash-term"]
                assert mine and mine[0]["pid"] == started["pid"]
                assert mine[0]["config"]["cmd"].endswith("sh")
                typed = {
                    "process": {"pid": started["pid"]},
                    "input": {"pty": base64.b64encode(b"echo via-rpc\n").decode()},
                }
                assert (
                    await client.post("/process.Process/SendInput", json=typed)
                ).status_code == 200
                seen = ""
                while "via-rpc\r\n" not in seen.replace("echo via-rpc", ""):
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if message["type"] == "output":
                        seen += message["data"]

    asyncio.run(run())


# -- filesystem ---------------------------------------------------------------------------------


def test_filesystem_calls(host_envd: HostEnvd) -> None:
    home = host_envd.root / Path(os.path.expanduser("~")).relative_to("/")
    (home / "dir" / "sub").mkdir(parents=True)
    (home / "dir" / "f.txt").write_text("hello")
    (home / "dir" / "sub" / "deep.txt").write_text("x")
    (home / "dir" / "link").symlink_to("f.txt")
    fs = "filesystem.Filesystem"
    virtual_home = os.path.expanduser("~")

    entry = unary(host_envd, f"{fs}/Stat", {"path": "dir/f.txt"}).json()["entry"]
    assert entry["path"] == f"{virtual_home}/dir/f.txt" and entry["name"] == "f.txt"
    assert entry["type"] == "FILE_TYPE_FILE" and entry["size"] == "5"
    assert entry["permissions"].startswith("-rw") and entry["modifiedTime"].endswith("Z")
    link = unary(host_envd, f"{fs}/Stat", {"path": "dir/link"}).json()["entry"]
    assert link["isSymlink"] is True and link["type"] == "FILE_TYPE_FILE"
    assert link["symlinkTarget"] == f"{virtual_home}/dir/f.txt"

    shallow = unary(host_envd, f"{fs}/ListDir", {"path": "dir"}).json()["entries"]
    assert [e["name"] for e in shallow] == ["f.txt", "link", "sub"]
    deep = unary(host_envd, f"{fs}/ListDir", {"path": "dir", "depth": 2}).json()["entries"]
    assert f"{virtual_home}/dir/sub/deep.txt" in [e["path"] for e in deep]
    not_dir = unary(host_envd, f"{fs}/ListDir", {"path": "dir/f.txt"})
    assert not_dir.json()["code"] == "invalid_argument"

    made = unary(host_envd, f"{fs}/MakeDir", {"path": "new/a/b"})
    assert made.json()["entry"]["type"] == "FILE_TYPE_DIRECTORY"
    assert unary(host_envd, f"{fs}/MakeDir", {"path": "new/a/b"}).json()["code"] == "already_exists"

    moved = unary(host_envd, f"{fs}/Move", {"source": "dir/f.txt", "destination": "x/y.txt"})
    assert moved.json()["entry"]["path"] == f"{virtual_home}/x/y.txt"
    assert (home / "x" / "y.txt").read_text() == "hello"
    assert unary(host_envd, f"{fs}/Remove", {"path": "dir"}).status_code == 200
    assert not (home / "dir").exists()
    # as E2B's envd (os.RemoveAll): removing what is not there succeeds
    gone = unary(host_envd, f"{fs}/Remove", {"path": "dir"})
    assert gone.status_code == 200 and gone.json() == {}

    escape = unary(host_envd, f"{fs}/Stat", {"path": "/../../etc/passwd"})
    assert escape.json()["code"] == "permission_denied"


def test_watchers_report_what_a_client_did(host_envd: HostEnvd) -> None:
    fs = "filesystem.Filesystem"
    home = os.path.expanduser("~")
    unary(host_envd, f"{fs}/MakeDir", {"path": "watched"})
    created = unary(host_envd, f"{fs}/CreateWatcher", {"path": "watched", "recursive": True})
    watcher_id = created.json()["watcherId"]
    upload = httpx.post(
        f"{host_envd.url}/files",
        params={"path": f"{home}/watched/sub/file.txt"},
        files={"file": ("file.txt", b"data")},
    )
    assert upload.status_code == 200, upload.text
    again = httpx.post(
        f"{host_envd.url}/files",
        params={"path": f"{home}/watched/sub/file.txt"},
        files={"file": ("file.txt", b"other data")},
    )
    assert again.status_code == 200, again.text
    unary(host_envd, f"{fs}/Remove", {"path": "watched/sub/file.txt"})
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + 10
    while ("sub/file.txt", "EVENT_TYPE_REMOVE") not in seen and time.monotonic() < deadline:
        got = unary(host_envd, f"{fs}/GetWatcherEvents", {"watcherId": watcher_id})
        seen += [(e["name"], e["type"]) for e in got.json()["events"]]
        time.sleep(0.05)
    assert ("sub", "EVENT_TYPE_CREATE") in seen
    # an upload reads as E2B's envd writes a file: created, chowned, written
    upload_events = [t for name, t in seen if name == "sub/file.txt"]
    assert upload_events == ["EVENT_TYPE_CREATE", "EVENT_TYPE_CHMOD", "EVENT_TYPE_WRITE"] * 2 + [
        "EVENT_TYPE_REMOVE"
    ], seen
    assert ("sub/file.txt", "EVENT_TYPE_REMOVE") in seen
    assert not [name for name, _ in seen if ".upload-" in name], seen
    assert unary(host_envd, f"{fs}/RemoveWatcher", {"watcherId": watcher_id}).status_code == 200
    gone = unary(host_envd, f"{fs}/GetWatcherEvents", {"watcherId": watcher_id})
    assert gone.json()["code"] == "not_found"


def test_watch_dir_streams_and_ends_with_its_directory(host_envd: HostEnvd) -> None:
    home = host_envd.root / Path(os.path.expanduser("~")).relative_to("/")
    (home / "w").mkdir()

    async def run() -> list[tuple[int, dict[str, Any]]]:
        async with httpx.AsyncClient(base_url=host_envd.url, timeout=30) as client:
            request = {"path": "w", "includeEntry": True}
            async with client.stream(
                "POST",
                "/filesystem.Filesystem/WatchDir",
                content=envelope(request),
                headers={"Content-Type": STREAM},
            ) as response:
                chunks = response.aiter_raw()
                body = await anext(chunks)
                (home / "w" / "new.txt").write_text("n")
                await asyncio.sleep(0.2)
                (home / "w" / "new.txt").unlink()
                (home / "w").rmdir()
                async for chunk in chunks:
                    body += chunk
                return frames(body)

    got = asyncio.run(run())
    assert got[0] == (0, {"start": {}})
    created = [m["filesystem"] for _, m in got if "filesystem" in m]
    assert created[0]["name"] == "new.txt" and created[0]["type"] == "EVENT_TYPE_CREATE"
    assert created[0]["entry"]["type"] == "FILE_TYPE_FILE"
    assert got[-1] == (2, {})


@pytest.mark.parametrize("depth", [0, 1])
def test_list_dir_depth_zero_means_one(host_envd: HostEnvd, depth: int) -> None:
    home = host_envd.root / Path(os.path.expanduser("~")).relative_to("/")
    (home / "d" / "e").mkdir(parents=True)
    entries = unary(
        host_envd, "filesystem.Filesystem/ListDir", {"path": "d", "depth": depth}
    ).json()["entries"]
    assert [e["name"] for e in entries] == ["e"]


def test_file_metadata_is_user_e2b_xattrs(host_envd: HostEnvd) -> None:
    """`X-Metadata-<key>` upload headers become `user.e2b.<key>` xattrs (keys lowercased),
    shown by Stat, ListDir and Move, gone when the file is replaced without metadata; bad keys
    or values are a 400 that writes nothing."""
    fs = "filesystem.Filesystem"
    home = host_envd.root / Path(os.path.expanduser("~")).relative_to("/")
    virtual_home = os.path.expanduser("~")

    def upload(name: str, body: bytes, raw: bool = False, **meta: str) -> httpx.Response:
        headers = {f"X-Metadata-{k}": v for k, v in meta.items()}
        params = {"path": f"{virtual_home}/meta/{name}"}
        if raw:
            headers["Content-Type"] = "application/octet-stream"
            return httpx.post(
                f"{host_envd.url}/files", params=params, content=body, headers=headers
            )
        return httpx.post(
            f"{host_envd.url}/files", params=params, files={"file": (name, body)}, headers=headers
        )

    made = upload("a.txt", b"x", Author="mish", purpose="upload")
    assert made.status_code == 200, made.text
    assert made.json()[0]["metadata"] == {"author": "mish", "purpose": "upload"}
    assert os.getxattr(home / "meta" / "a.txt", "user.e2b.author") == b"mish"
    raw = upload("b.txt", b"y", raw=True, tag="raw")
    assert raw.json()[0]["metadata"] == {"tag": "raw"}
    stat_a = unary(host_envd, f"{fs}/Stat", {"path": "meta/a.txt"}).json()["entry"]
    assert stat_a["metadata"] == {"author": "mish", "purpose": "upload"}
    listed = unary(host_envd, f"{fs}/ListDir", {"path": "meta"}).json()["entries"]
    assert {e["name"]: e.get("metadata") for e in listed} == {
        "a.txt": {"author": "mish", "purpose": "upload"},
        "b.txt": {"tag": "raw"},
    }
    moved = unary(host_envd, f"{fs}/Move", {"source": "meta/b.txt", "destination": "meta/c.txt"})
    assert moved.json()["entry"]["metadata"] == {"tag": "raw"}
    # set out of band, in the namespace: shown too
    os.setxattr(home / "meta" / "c.txt", "user.e2b.extra", b"1")
    os.setxattr(home / "meta" / "c.txt", "user.other", b"hidden")
    stat_c = unary(host_envd, f"{fs}/Stat", {"path": "meta/c.txt"}).json()["entry"]
    assert stat_c["metadata"] == {"tag": "raw", "extra": "1"}
    # replaced without metadata: none left
    plain = upload("a.txt", b"z")
    assert "metadata" not in plain.json()[0]
    assert "metadata" not in unary(host_envd, f"{fs}/Stat", {"path": "meta/a.txt"}).json()["entry"]
    # bad input: 400, nothing written
    bad_headers: list[dict[bytes, bytes]] = [
        {b"X-Metadata-": b"empty key"},
        {b"X-Metadata-good": "caf\u00e9".encode("latin-1")},
        {b"X-Metadata-big": b"v" * 4000},
    ]
    for bad in bad_headers:
        refused = httpx.post(
            f"{host_envd.url}/files",
            params={"path": f"{virtual_home}/meta/refused.txt"},
            files={"file": ("refused.txt", b"x")},
            headers=bad,
        )
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"] == "invalid_metadata", refused.text
    assert not (home / "meta" / "refused.txt").exists()


def test_list_dir_is_depth_first_by_name(host_envd: HostEnvd) -> None:
    """E2B's envd walks as Go's filepath.WalkDir: a directory, then what is in it."""
    home = host_envd.root / Path(os.path.expanduser("~")).relative_to("/")
    for rel in ("top/a/x", "top/a/y", "top/b"):
        (home / rel).mkdir(parents=True)
    (home / "top" / "c.txt").write_text("c")
    listed = unary(host_envd, "filesystem.Filesystem/ListDir", {"path": "top", "depth": 2})
    names = [e["path"].split("/top/", 1)[1] for e in listed.json()["entries"]]
    assert names == ["a", "a/x", "a/y", "b", "c.txt"]
