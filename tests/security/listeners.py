"""A TCP listener that records every connection and request it gets (a port that must never
be reached, or a stand-in envd that shows what the proxy sent)."""

from __future__ import annotations

import socket
import threading
from types import TracebackType


class RecordingListener:
    def __init__(self, host: str = "127.0.0.1", answer: bytes | None = None) -> None:
        self.sock = socket.create_server((host, 0))
        self.port: int = self.sock.getsockname()[1]
        self.requests: list[bytes] = []
        self.connections = 0
        self.answer = answer or (
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nreached"
        )
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            break
                        data += chunk
                    self.requests.append(data)
                    conn.sendall(self.answer)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RecordingListener:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def raw_request(port: int, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (no client normalises the target) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        data = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
