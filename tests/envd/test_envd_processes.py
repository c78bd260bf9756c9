"""/processes and /exec against a real envd."""

from __future__ import annotations

import base64
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from .conftest import Envd, wait_for


def events(client: httpx.Client, ref: int | str, **params: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"/processes/{ref}/events", params=params) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        return [json.loads(line) for line in r.iter_lines() if line]


def text_of(evts: list[dict[str, Any]], stream: str) -> bytes:
    out = b""
    for e in evts:
        if e["type"] == stream:
            out += base64.b64decode(e["data"]) if e["encoding"] == "base64" else e["data"].encode()
    return out


def test_start_stream_and_exit(client: httpx.Client) -> None:
    r = client.post("/processes", json={"cmd": "echo out; echo err >&2; exit 7", "tag": "t-exit"})
    assert r.status_code == 200
    pid = r.json()["pid"]
    assert r.json()["tag"] == "t-exit"
    evts = events(client, pid)
    assert evts[0] == {
        "type": "start",
        "pid": pid,
        "tag": "t-exit",
        "cmd": "echo out; echo err >&2; exit 7",
    }
    assert text_of(evts, "stdout") == b"out\n"
    assert text_of(evts, "stderr") == b"err\n"
    assert evts[-1] == {"type": "exit", "exit_code": 7, "signal": None}
    info = client.get("/processes/t-exit").json()
    assert info["pid"] == pid and info["alive"] is False and info["exit_code"] == 7


def test_a_late_subscriber_gets_the_whole_output_of_a_short_command(client: httpx.Client) -> None:
    pid = client.post("/processes", json={"argv": ["seq", "1", "20000"]}).json()["pid"]
    wait_for(lambda: client.get(f"/processes/{pid}").json()["alive"] is False)
    evts = events(client, pid, encoding="utf8")
    expected = "".join(f"{i}\n" for i in range(1, 20001)).encode()
    assert text_of(evts, "stdout") == expected
    assert all(e["type"] != "dropped" for e in evts)
    assert evts[-1]["exit_code"] == 0


def test_output_beyond_the_buffer_is_reported_as_dropped(client: httpx.Client) -> None:
    pid = client.post("/processes", json={"cmd": "head -c 3000000 /dev/zero"}).json()["pid"]
    wait_for(lambda: client.get(f"/processes/{pid}").json()["alive"] is False)
    evts = events(client, pid)
    assert evts[1] == {"type": "dropped"}
    kept = len(text_of(evts, "stdout"))
    assert 0 < kept <= 1024 * 1024


def test_a_live_subscriber_slows_the_child_instead_of_losing_output(client: httpx.Client) -> None:
    pid = client.post("/processes", json={"cmd": "sleep 0.3; head -c 5000000 /dev/zero"}).json()[
        "pid"
    ]
    evts = events(client, pid)
    assert len(text_of(evts, "stdout")) == 5_000_000
    assert all(e["type"] != "dropped" for e in evts)


def test_stdin_write_and_close(client: httpx.Client) -> None:
    pid = client.post("/processes", json={"argv": ["cat"], "stdin": True}).json()["pid"]
    r = client.post(f"/processes/{pid}/stdin", json={"data": "hello "})
    assert r.json() == {"ok": True, "bytes": 6}
    raw = base64.b64encode("wörld\n".encode()).decode()
    assert client.post(f"/processes/{pid}/stdin", json={"b64": raw}).status_code == 200
    assert client.post(f"/processes/{pid}/close-stdin").json() == {"ok": True}
    evts = events(client, pid, encoding="utf8")
    assert text_of(evts, "stdout").decode() == "hello wörld\n"
    assert evts[-1]["exit_code"] == 0
    r = client.post(f"/processes/{pid}/stdin", json={"data": "late"})
    assert r.status_code == 409
    assert r.json()["error"] == "not_running"


def test_signal_by_tag_reaches_the_whole_group(client: httpx.Client) -> None:
    r = client.post("/processes", json={"cmd": "sleep 30 & sleep 30; wait", "tag": "sleeper"})
    pid = r.json()["pid"]
    started = time.monotonic()
    r = client.post("/processes/sleeper/signal", json={"signal": "TERM"})
    assert r.json() == {"ok": True, "signal": "SIGTERM"}
    evts = events(client, pid)
    assert evts[-1] == {"type": "exit", "exit_code": 143, "signal": "SIGTERM"}
    assert time.monotonic() - started < 5
    r = client.post("/processes/sleeper/signal", json={"signal": 9})
    assert r.status_code == 409


def test_processes_outlive_the_request_and_are_listed(client: httpx.Client) -> None:
    started = time.monotonic()
    r = client.post("/processes", json={"cmd": "sleep 0.5; echo later", "tag": "bg-1"})
    assert time.monotonic() - started < 0.5
    pid = r.json()["pid"]
    listed = {p["tag"]: p for p in client.get("/processes").json()}
    assert listed["bg-1"]["pid"] == pid
    assert listed["bg-1"]["alive"] is True
    assert text_of(events(client, "bg-1"), "stdout") == b"later\n"


def test_duplicate_live_tag_is_409(client: httpx.Client) -> None:
    pid = client.post("/processes", json={"argv": ["sleep", "5"], "tag": "dup"}).json()["pid"]
    r = client.post("/processes", json={"argv": ["true"], "tag": "dup"})
    assert r.status_code == 409
    assert r.json()["error"] == "tag_in_use"
    client.post(f"/processes/{pid}/signal", json={"signal": "KILL"})


def test_default_cwd_is_home_and_explicit_cwd_must_exist(envd: Envd, client: httpx.Client) -> None:
    out = client.post("/exec", json={"cmd": "pwd"}).json()
    assert out["stdout"].strip() == str(envd.home.resolve())
    (envd.root / "work").mkdir(exist_ok=True)
    out = client.post("/exec", json={"argv": ["pwd"], "cwd": "/work"}).json()
    assert out["stdout"].strip() == str((envd.root / "work").resolve())
    r = client.post("/exec", json={"argv": ["pwd"], "cwd": "/nowhere"})
    assert r.status_code == 400
    assert r.json()["error"] == "invalid_cwd"


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/processes", b"{broken", 400, "bad_json"),
        ("/processes", b"", 400, "empty_body"),
        ("/processes", b"[]", 400, "invalid_body"),
        ("/processes", b'{"cmd": "x", "argv": ["x"]}', 400, "bad_request"),
        ("/processes", b"{}", 400, "bad_request"),
        ("/processes", b'{"argv": "ls"}', 400, "invalid_field"),
        ("/processes", b'{"argv": []}', 400, "bad_request"),
        ("/processes", b'{"cmd": "x", "env": {"A": 1}}', 400, "invalid_field"),
        ("/processes", b'{"cmd": "x", "stdin": "yes"}', 400, "invalid_field"),
        ("/processes", b'{"cmd": "x", "tag": "12"}', 400, "invalid_tag"),
        ("/processes", b'{"argv": ["/no/such/binary"]}', 400, "command_not_found"),
        ("/exec", b'{"cmd": "x", "timeout": "soon"}', 400, "invalid_field"),
        ("/exec", b'{"cmd": "x", "timeout": -1}', 400, "invalid_field"),
        ("/exec?stream=maybe", b'{"cmd": "x"}', 400, "invalid_query"),
        ("/processes/999999999/signal", b'{"signal": "TERM"}', 404, "unknown_process"),
        ("/processes/no-such-tag/stdin", b'{"data": "x"}', 404, "unknown_process"),
        ("/processes/no-such-tag/close-stdin", b"", 404, "unknown_process"),
    ],
)
def test_bad_process_requests(
    client: httpx.Client, path: str, body: bytes, status: int, code: str
) -> None:
    r = client.post(path, content=body)
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    assert client.get("/health").status_code == 200


def test_bad_requests_about_a_known_process(client: httpx.Client) -> None:
    pid = client.post("/processes", json={"argv": ["sleep", "5"]}).json()["pid"]
    for body, status, code in (
        ({"signal": "SIGBOGUS"}, 400, "invalid_signal"),
        ({"signal": [15]}, 400, "invalid_signal"),
    ):
        r = client.post(f"/processes/{pid}/signal", json=body)
        assert (r.status_code, r.json()["error"]) == (status, code)
    r = client.post(f"/processes/{pid}/stdin", json={"data": "x"})
    assert (r.status_code, r.json()["error"]) == (409, "stdin_closed")
    r = client.post(f"/processes/{pid}/stdin", json={"data": "x", "b64": "eA=="})
    assert r.status_code == 400
    assert client.get(f"/processes/{pid}/events", params={"encoding": "ebcdic"}).status_code == 400
    assert client.get("/processes/nope/events").status_code == 404
    client.post(f"/processes/{pid}/signal", json={"signal": "KILL"})


def test_exec_collects_output_and_exit_code(client: httpx.Client) -> None:
    r = client.post(
        "/exec", json={"cmd": "printf 'a\\xffb'; echo oops >&2; exit 3", "env": {"X": "1"}}
    )
    assert r.status_code == 200
    out = r.json()
    assert out["exit_code"] == 3
    assert out["stdout"] == "a\ufffdb"
    assert out["stderr"] == "oops\n"
    assert out["timed_out"] is False
    r = client.post(
        "/exec",
        json={"argv": ["sh", "-c", "echo $X; cat"], "env": {"X": "env!"}, "input": "from stdin"},
    )
    assert r.json()["stdout"] == "env!\nfrom stdin"


def test_exec_timeout_kills_the_group(client: httpx.Client) -> None:
    started = time.monotonic()
    out = client.post("/exec", json={"cmd": "echo begun; sleep 30", "timeout": 0.5}).json()
    assert time.monotonic() - started < 5
    assert out["timed_out"] is True
    assert out["exit_code"] == 124
    assert out["stdout"] == "begun\n"


def test_exec_does_not_wait_for_a_daemon_holding_the_pipes(client: httpx.Client) -> None:
    started = time.monotonic()
    out = client.post("/exec", json={"cmd": "sleep 20 & echo spawned"}).json()
    assert out["stdout"] == "spawned\n"
    assert out["exit_code"] == 0
    assert time.monotonic() - started < 3


def test_exec_stream(client: httpx.Client) -> None:
    with client.stream(
        "POST",
        "/exec",
        params={"stream": "1"},
        json={"cmd": "echo one; sleep 0.2; echo two; exit 4"},
    ) as r:
        assert r.status_code == 200
        evts = [json.loads(line) for line in r.iter_lines() if line]
    assert evts[0]["type"] == "start"
    assert "".join(e["data"] for e in evts if e["type"] == "stdout") == "one\ntwo\n"
    assert evts[-1] == {"type": "exit", "exit_code": 4, "signal": None, "timed_out": False}
    r = client.post("/exec", params={"stream": "1"}, json={"argv": ["/no/such/thing"]})
    assert r.status_code == 400


def test_a_hanging_event_stream_does_not_block_other_requests(envd: Envd) -> None:
    with envd.client() as c:
        pid = c.post("/processes", json={"argv": ["sleep", "3"]}).json()["pid"]
    done = threading.Event()

    def subscribe() -> None:
        with envd.client() as c, c.stream("GET", f"/processes/{pid}/events") as r:
            for _ in r.iter_lines():
                pass
        done.set()

    t = threading.Thread(target=subscribe, daemon=True)
    t.start()
    with envd.client() as c:
        started = time.monotonic()
        assert c.get("/metrics").status_code == 200
        assert time.monotonic() - started < 1
        c.post(f"/processes/{pid}/signal", json={"signal": "KILL"})
    assert done.wait(5)


def test_subscribing_without_replay_starts_at_live_output(envd: Envd, client: httpx.Client) -> None:
    pid = client.post("/processes", json={"cmd": "echo early; cat", "stdin": True}).json()["pid"]
    time.sleep(0.3)
    with (
        envd.client() as other,
        client.stream(
            "GET", f"/processes/{pid}/events", params={"replay": "0", "encoding": "utf8"}
        ) as r,
    ):
        lines = r.iter_lines()
        assert json.loads(next(lines))["type"] == "start"
        other.post(f"/processes/{pid}/stdin", json={"data": "late\n"})
        other.post(f"/processes/{pid}/close-stdin")
        evts = [json.loads(line) for line in lines if line]
    assert "".join(e["data"] for e in evts if e["type"] == "stdout") == "late\n"
    assert [e["type"] for e in evts] == ["stdout", "exit"]  # no "dropped": nothing was missed


def test_oversized_json_body_is_413(client: httpx.Client) -> None:
    r = client.post("/exec", json={"cmd": "true", "input": "x" * (9 * 1024 * 1024)})
    assert r.status_code == 413
    assert r.json()["error"] == "payload_too_large"
    assert client.get("/health").status_code == 200


def test_children_inherit_no_descriptors_of_envd(client: httpx.Client) -> None:
    code = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    out = client.post("/exec", json={"argv": [sys.executable, "-c", code]}).json()
    assert out["stdout"] == "[0, 1, 2, 3]\n"


def test_children_get_default_signal_handling_even_under_nohup(
    envd_factory: Callable[..., Envd],
) -> None:
    """envd started with SIGHUP ignored (nohup) must not pass that on: a hangup ends a
    command, and a PTY shell, as it would anywhere else."""
    instance = envd_factory(prefix=("nohup",))
    with instance.client() as c:
        out = c.post("/exec", json={"cmd": "kill -HUP $$; echo survived"}).json()
        assert out["stdout"] == ""
        assert (out["exit_code"], out["signal"]) == (129, "SIGHUP")
        status = c.post("/exec", json={"argv": ["grep", "^SigIgn", "/proc/self/status"]}).json()
        ignored = int(status["stdout"].split()[1], 16)
        # Nothing a program can handle is left ignored. glibc reserves signals 32 and 33 for
        # itself (no process can set them, and its threads install their own handlers), so a
        # launcher that ignored them passes that on unchanged.
        settable = sum(1 << (sig - 1) for sig in signal.valid_signals())
        assert ignored & settable == 0, f"{ignored:#x}"
