"""``http://{port}-{capsule id}.{host}`` (the Wrenn SDK's ``get_url``): HTTP to a program's port
inside the capsule through envd's /tcp tunnel. Here the capsules are host envd processes (their
"inside" is the host's loopback); tests/wrenn/test_sdk_vm.py does it in a real capsule."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from backend.runtime.ports import free_port
from tests.e2b.conftest import ServerThread


class Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._answer(b"")

    def do_POST(self) -> None:
        self._answer(self.rfile.read(int(self.headers.get("content-length", 0))))

    def _answer(self, body: bytes) -> None:
        payload = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "body": body.decode(),
                "host": self.headers["host"],
            }
        ).encode()
        self.send_response(201)
        self.send_header("content-type", "application/json")
        self.send_header("x-app", "echo")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def app_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_port_in_the_capsule_answers_through_its_url(
    host_api: ServerThread, app_port: int
) -> None:
    with host_api.client() as client:
        created = client.post("/v2/sandboxes", json={"templateID": "base"})
        assert created.status_code == 201, created.text
        capsule_id = created.json()["sandboxID"]
    host = f"{app_port}-{capsule_id}.localhost"
    with httpx.Client(base_url=host_api.url, headers={"host": host}, timeout=30) as app:
        got = app.get("/hello?x=1")
        assert got.status_code == 201, got.text
        assert got.headers["x-app"] == "echo"
        assert got.json() == {
            "method": "GET", "path": "/hello?x=1", "body": "", "host": f"localhost:{app_port}"
        }  # fmt: skip
        posted = app.post("/form", content=b"a" * 300_000)
        assert posted.json()["body"] == "a" * 300_000
        closed = free_port()
        refused = app.get("/", headers={"host": f"{closed}-{capsule_id}.localhost"})
        assert refused.status_code == 502 and "nothing answers" in refused.text, refused.text
        envd = app.get("/", headers={"host": f"49983-{capsule_id}.localhost"})
        assert envd.status_code == 400, envd.text
        unknown = app.get("/", headers={"host": f"{app_port}-cl-000000000000.localhost"})
        assert unknown.status_code == 404 and "not found" in unknown.text
    with host_api.client() as client:
        assert client.post(f"/sandboxes/{capsule_id}/pause").status_code == 204
    paused = httpx.get(f"{host_api.url}/", headers={"host": host}, timeout=30)
    assert paused.status_code == 409 and "paused" in paused.text
