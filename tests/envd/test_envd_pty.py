"""The /pty WebSocket against a real envd."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .conftest import Envd, Pty, pty_socket


async def start(pty: Pty, **fields: object) -> dict[str, object]:
    await pty.send(type="start", **fields)
    return await pty.expect("started")


async def test_default_shell_is_a_login_shell_in_home(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        started = await start(pty, cols=100, rows=30)
        assert isinstance(started["pid"], int)
        assert started["cols"] == 100 and started["rows"] == 30
        await pty.send(
            type="input",
            data="echo T=$TERM; pwd; echo $((6*7)); case $0 in -*) echo LOGIN;; esac\n",
        )
        out = await pty.read_until("42\r\n")
        assert "T=xterm-256color" in out
        assert str(envd.home.resolve()) in out
        await pty.send(type="input", data="exit 3\n")
        exit_msg = await pty.expect("exit")
        assert exit_msg["exit_code"] == 3
        assert "LOGIN" in pty.output  # argv[0] starts with "-": a login shell


async def test_command_with_args_and_exit_code(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        await start(pty, cmd="/bin/sh", args=["-c", "printf 'tty:'; test -t 0 && echo yes; exit 5"])
        assert (await pty.expect("exit"))["exit_code"] == 5
        assert "tty:yes" in pty.output
        # The socket stays usable after an exit: a new session can be started on it.
        await start(pty, cmd="/bin/sh", args=["-c", "echo again"])
        await pty.expect("exit")
        assert "again" in pty.output


async def test_resize_and_invalid_sizes(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        await start(pty, cmd="/bin/sh", cols=80, rows=24)
        await pty.send(type="resize", cols=132, rows=40)
        await pty.send(type="input", data="stty size\n")
        await pty.read_until("40 132")
        for cols, rows in ((0, 10), (100000, 10), (10, 0), (10, 100000)):
            await pty.send(type="resize", cols=cols, rows=rows)
            err = await pty.expect("error")
            assert err["error"] == "invalid_size" and err["request"] == "resize"
        await pty.send(type="resize", cols="wide", rows=3)
        assert (await pty.expect("error"))["error"] == "invalid_field"
        pty.output = ""
        await pty.send(type="input", data="stty size\n")
        await pty.read_until("40 132")
        await pty.send(type="kill")
        assert (await pty.expect("exit"))["signal"] == "SIGKILL"


async def test_start_with_a_bad_size_or_cwd_starts_nothing(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        await pty.send(type="start", cols=0, rows=24)
        assert (await pty.expect("error"))["error"] == "invalid_size"
        await pty.send(type="start", cwd="/no/such/dir")
        assert (await pty.expect("error"))["error"] == "invalid_cwd"
        await pty.send(type="start", cmd="/no/such/program")
        assert (await pty.expect("error"))["error"] == "command_not_found"
        await pty.send(type="input", data="x")
        assert (await pty.expect("error"))["error"] == "not_attached"


async def test_garbage_messages_get_errors_and_the_socket_survives(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        for raw, code in (
            ("this is not json", "bad_json"),
            ("[1, 2]", "invalid_message"),
            ('{"no": "type"}', "invalid_message"),
            ('{"type": 5}', "invalid_message"),
            ('{"type": "teleport"}', "unknown_type"),
            ('{"type": "connect"}', "invalid_field"),
            ('{"type": "connect", "tag": "nope"}', "unknown_session"),
            ('{"type": "input", "b64": "%%%"}', "invalid_field"),
            ('{"type": "kill", "signal": "SIGNOPE"}', "invalid_signal"),
        ):
            await pty.ws.send(raw)
            err = await pty.expect("error")
            assert err["error"] == code, raw
            assert err["message"]
        await pty.ws.send(b"\x00\x01binary")
        assert (await pty.expect("error"))["error"] == "bad_request"
        await pty.send(type="ping")
        assert (await pty.expect("pong"))["type"] == "pong"


async def test_sessions_outlive_the_socket_and_replay_on_connect(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        await start(pty, cmd="/bin/sh", tag="keep-me")
        await pty.send(type="input", data="echo marker-$((1+1))\n")
        await pty.read_until("marker-2")
    with httpx.Client(base_url=envd.url) as c:
        sessions = {s["tag"]: s for s in c.get("/pty").json()}
    assert sessions["keep-me"]["alive"] is True
    assert sessions["keep-me"]["attached"] == 0
    async with pty_socket(envd) as pty:
        await pty.send(type="connect", tag="keep-me")
        connected = await pty.expect("connected")
        assert connected["alive"] is True
        await pty.read_until("marker-2")  # replayed
        await pty.send(type="input", data="echo after-$((2+2))\n")
        await pty.read_until("after-4")
        await pty.send(type="detach")
        assert (await pty.expect("detached"))["tag"] == "keep-me"
        await pty.send(type="input", data="x")
        assert (await pty.expect("error"))["error"] == "not_attached"
        await pty.send(type="connect", tag="keep-me")
        await pty.expect("connected")
        await pty.send(type="start", cmd="/bin/sh")
        assert (await pty.expect("error"))["error"] == "already_attached"
        # Interactive shells ignore SIGTERM; a hangup ends them.
        await pty.send(type="kill", signal="SIGHUP")
        assert (await pty.expect("exit"))["exit_code"] == 129


async def test_two_sockets_can_watch_one_session(envd: Envd) -> None:
    async with pty_socket(envd) as a, pty_socket(envd) as b:
        await start(a, cmd="/bin/sh", tag="shared")
        await b.send(type="connect", tag="shared")
        await b.expect("connected")
        await a.send(type="input", data="echo both-$((3*3))\n")
        await a.read_until("both-9")
        await b.read_until("both-9")
        await a.send(type="kill")
        await a.expect("exit")
        await b.expect("exit")


async def test_multibyte_characters_split_across_reads_survive(envd: Envd) -> None:
    code = "import os; os.write(1, ('€a' * 60000).encode())"
    async with pty_socket(envd) as pty:
        await start(pty, cmd=sys.executable, args=["-c", code])
        await pty.expect("exit")
    assert "\ufffd" not in pty.output
    assert pty.output.count("€") == 60000


async def test_binary_input_through_b64(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        await start(pty, cmd="/bin/sh")
        await pty.send(type="input", b64=base64.b64encode(b"echo b64-ok\n").decode())
        await pty.read_until("b64-ok\r\n")
        await pty.send(type="kill")
        await pty.expect("exit")


async def test_a_socket_dying_mid_frame_hurts_no_one(envd: Envd) -> None:
    async with pty_socket(envd) as pty:
        await start(pty, cmd="cat", tag="bystander")
        for _ in range(3):
            raw = socket.create_connection(("127.0.0.1", envd.port))
            raw.sendall(
                b"GET /pty HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await asyncio.sleep(0.1)
            # A masked text frame that announces 1000 bytes, then only 5, then the socket dies.
            raw.sendall(bytes([0x81, 0xFE, 0x03, 0xE8, 1, 2, 3, 4]) + b"hello")
            raw.close()
        await pty.send(type="input", data="still-alive\n")
        await pty.read_until("still-alive")
        await pty.send(type="kill")
        await pty.expect("exit")
    assert httpx.get(f"{envd.url}/health").status_code == 200


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_a_flood_of_output_does_not_grow_memory(envd: Envd) -> None:
    before = rss_kib(envd.proc.pid)
    async with pty_socket(envd) as pty:
        # Attached but not reading: envd must pause the reader, not buffer `yes` forever.
        await start(pty, cmd="yes", tag="flood")
        await asyncio.sleep(1.5)
        mid = rss_kib(envd.proc.pid)
        # Then read for a while: output keeps flowing, coalesced into big messages.
        for _ in range(20):
            await pty.recv()
        assert "y\r\ny\r\n" in pty.output
        await pty.send(type="detach")
        await pty.expect("detached", timeout=20)
    # Detached: the session keeps running, the ring keeps only recent output.
    await asyncio.sleep(1.0)
    after = rss_kib(envd.proc.pid)
    async with pty_socket(envd) as pty:
        await pty.send(type="connect", tag="flood")
        await pty.expect("connected")
        await pty.send(type="kill")
        await pty.expect("exit")
    assert mid - before < 30_000, (before, mid)
    assert after - before < 30_000, (before, after)


async def test_websocket_needs_the_token_once_set(envd_factory: Callable[..., Envd]) -> None:
    envd = envd_factory()
    httpx.post(f"{envd.url}/init", json={"accessToken": "tok"})
    with pytest.raises(InvalidStatus) as err:
        async with connect(envd.ws_url):
            pass
    assert err.value.response.status_code == 401
    async with connect(envd.ws_url, additional_headers={"X-Access-Token": "tok"}) as ws:
        await ws.send('{"type": "ping"}')
        assert "pong" in str(await ws.recv())
    async with connect(envd.ws_url + "?access_token=tok") as ws:
        await ws.send('{"type": "ping"}')
        assert "pong" in str(await ws.recv())


async def test_server_pings_on_the_configured_interval(envd_factory: Callable[..., Envd]) -> None:
    envd = envd_factory("--ping-interval", "0.2")
    async with connect(envd.ws_url) as ws:
        raw = await asyncio.wait_for(ws.recv(), 3)
        assert raw == '{"type":"ping"}'


async def test_pty_list_and_cwd(envd: Envd) -> None:
    (envd.root / "proj").mkdir(exist_ok=True)
    async with pty_socket(envd) as pty:
        await start(pty, cmd="/bin/sh", cwd="/proj", tag="listed", cols=90, rows=20)
        await pty.send(type="input", data="pwd\n")
        await pty.read_until(str((envd.root / "proj").resolve()))
        sessions = {s["tag"]: s for s in httpx.get(f"{envd.url}/pty").json()}
        entry = sessions["listed"]
        assert (entry["cols"], entry["rows"], entry["alive"], entry["attached"]) == (
            90,
            20,
            True,
            1,
        )
        assert entry["cwd"] == "/proj"
        assert entry["pid"] > 0 and os.path.exists(f"/proc/{entry['pid']}")
        await pty.send(type="kill")
        await pty.expect("exit")


async def test_the_child_inherits_no_descriptor_but_its_terminal(envd: Envd) -> None:
    code = "import os; print('fds', sorted(int(f) for f in os.listdir('/proc/self/fd')))"
    async with pty_socket(envd) as pty:
        await start(pty, cmd=sys.executable, args=["-c", code])
        await pty.expect("exit")
    # 0-2 are the terminal; 3 is listdir's own handle on /proc/self/fd.
    assert "fds [0, 1, 2, 3]" in pty.output


async def test_a_hangup_ends_a_shell_even_when_envd_ignores_it(
    envd_factory: Callable[..., Envd],
) -> None:
    """Under nohup envd ignores SIGHUP; its shells must not inherit that (the PTY path adds
    its own controlling-terminal setup to the same child preparation)."""
    instance = envd_factory(prefix=("nohup",))
    async with pty_socket(instance) as pty:
        await start(pty, cmd="/bin/sh", tag="hup")
        await pty.send(type="input", data="tty; grep ^SigIgn /proc/$$/status\n")
        await pty.read_until("/dev/pts/")
        await pty.send(type="kill", signal="SIGHUP")
        assert (await pty.expect("exit"))["exit_code"] == 129
