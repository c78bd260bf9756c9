"""Identity from the metadata source: file and TCP, good and bad answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import Envd, wait_for


def id_files(envd: Envd) -> tuple[str | None, str | None]:
    run = envd.root / "run" / "wrenn"
    values = []
    for name in (".WRENN_SANDBOX_ID", ".WRENN_TEMPLATE_ID"):
        path = run / name
        values.append(path.read_text() if path.exists() else None)
    return values[0], values[1]


def test_file_source_is_polled_and_published(
    tmp_path: Path, envd_factory: Callable[..., Envd]
) -> None:
    meta = tmp_path / "metadata.json"
    meta.write_text(json.dumps({"instanceID": "sb-1", "envID": "tpl-1", "address": "x"}))
    envd = envd_factory("--metadata", f"file:{meta}", "--metadata-interval", "0.1")
    wait_for(lambda: id_files(envd) == ("sb-1", "tpl-1"))
    with envd.client() as c:
        out = c.post("/exec", json={"cmd": "echo $WRENN_SANDBOX_ID $E2B_TEMPLATE_ID"}).json()
        assert out["stdout"] == "sb-1 tpl-1\n"
        # A restored clone gets a new identity from the host.
        meta.write_text(json.dumps({"instanceID": "sb-2", "templateID": "tpl-1"}))
        wait_for(lambda: id_files(envd) == ("sb-2", "tpl-1"))
        # Garbage, partial answers and a vanished source change nothing and break nothing.
        for bad in ("{not json", "[1]", '{"instanceID": 7}', "{}"):
            meta.write_text(bad)
            with pytest.raises(AssertionError):
                wait_for(lambda: id_files(envd) != ("sb-2", "tpl-1"), timeout=0.3)
        meta.unlink()
        assert c.get("/health").status_code == 200
        out = c.post("/exec", json={"cmd": "echo $WRENN_SANDBOX_ID"}).json()
        assert out["stdout"] == "sb-2\n"
    assert "metadata poll failed" in envd.log()


@pytest.fixture
def metadata_server() -> Iterator[tuple[int, list[bytes]]]:
    """Answers each connection with the current payload, then closes (like QEMU guestfwd)."""
    payload = [b'{"instanceID": "tcp-sb", "templateID": "tcp-tpl"}']
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(payload[0])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], payload
    stop.set()
    thread.join(2)
    server.close()


def test_tcp_source(
    metadata_server: tuple[int, list[bytes]], envd_factory: Callable[..., Envd]
) -> None:
    port, payload = metadata_server
    envd = envd_factory("--metadata", f"tcp:127.0.0.1:{port}", "--metadata-interval", "0.1")
    wait_for(lambda: id_files(envd) == ("tcp-sb", "tcp-tpl"))
    payload[0] = b'{"instanceID": "tcp-sb-2"'  # cut off: ignored
    with pytest.raises(AssertionError):
        wait_for(lambda: id_files(envd)[0] != "tcp-sb", timeout=0.4)
    payload[0] = b'{"instanceID": "tcp-sb-2"}'
    wait_for(lambda: id_files(envd) == ("tcp-sb-2", "tcp-tpl"))


def test_unreachable_tcp_source_does_not_stop_envd(envd_factory: Callable[..., Envd]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    envd = envd_factory("--metadata", f"tcp:127.0.0.1:{closed_port}", "--metadata-interval", "0.1")
    with envd.client() as c:
        assert c.get("/metrics").status_code == 200
        assert c.post("/init", json={"instanceID": "pushed"}).status_code == 200
    assert id_files(envd) == ("pushed", None)
    wait_for(lambda: "metadata poll failed" in envd.log())
    # The same failure is logged once, not every poll.
    time.sleep(0.5)
    assert envd.log().count("metadata poll failed") == 1
