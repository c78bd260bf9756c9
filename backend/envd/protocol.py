"""envd's wire constants, shared by envd itself and by every host-side client of it (the
capsule manager's client, the sampler's poller, the terminal clients, the API's proxy).

The contract in words is backend/envd/__init__.py; this module holds what code on both
sides must agree on byte for byte. It imports only the standard library: the guest imports it.
"""

from __future__ import annotations

import base64
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

ENVD_PORT: Final = 49983
"""The port envd listens on inside the guest (the host reaches it through a forward)."""

TOKEN_HEADER: Final = "X-Access-Token"
"""Every request but GET /health carries the capsule's access token in this header."""
TOKEN_QUERY: Final = "access_token"
"""WebSocket handshakes may carry it in this query parameter instead (browsers cannot set
headers there)."""

HEALTH_PATH: Final = "/health"
INIT_PATH: Final = "/init"
METRICS_PATH: Final = "/metrics"
PTY_PATH: Final = "/pty"

METADATA_FW_CFG_NAME: Final = "opt/wrenn/metadata"
"""The capsule's metadata document reaches the guest as this QEMU fw_cfg file: read-only,
no network, no host process per read; the guest's `qemu_fw_cfg` driver shows it at
METADATA_GUEST_PATH (root-only, so the first access token stays away from the guest's users)."""
METADATA_GUEST_PATH: Final = f"/sys/firmware/qemu_fw_cfg/by_name/{METADATA_FW_CFG_NAME}/raw"
METADATA_FW_CFG_SIZE: Final = 4096
"""Every metadata blob has this size, the JSON padded with spaces: the guest's driver reads the
file list once at boot, so a restored or cloned guest keeps the size its template booted with."""

# -- what the host reads from a guest (the guest is not trusted: every body is capped) ----------

MAX_SMALL_BODY: Final = 1 << 20
"""/health, /metrics, /init, /snapshot/*: a few hundred bytes from a real envd."""
MAX_EXEC_BODY: Final = 80 << 20
"""/exec: envd caps stdout and stderr at 16 MiB each; JSON escaping can grow them."""
MAX_PTY_MESSAGE: Final = 16 << 20
"""One /pty frame: a 128 KiB output batch can grow sixfold when control characters are
escaped in JSON."""

# -- the /pty WebSocket's JSON messages -------------------------------------------------------

PTY_START: Final = "start"
PTY_CONNECT: Final = "connect"
PTY_INPUT: Final = "input"
PTY_RESIZE: Final = "resize"
PTY_KILL: Final = "kill"
PTY_DETACH: Final = "detach"
PTY_PING: Final = "ping"
PTY_PONG: Final = "pong"
PTY_STARTED: Final = "started"
PTY_CONNECTED: Final = "connected"
PTY_OUTPUT: Final = "output"
PTY_EXIT: Final = "exit"
PTY_DETACHED: Final = "detached"
PTY_ERROR: Final = "error"
PTY_UNKNOWN_SESSION: Final = "unknown_session"
"""The error code of a `connect` to a tag envd does not know."""
PTY_ATTACH_REPLIES: Final = frozenset({PTY_STARTED, PTY_CONNECTED})


def auth_headers(token: str | None) -> dict[str, str]:
    return {TOKEN_HEADER: token} if token else {}


def pty_ws_url(envd_url: str) -> str:
    """``http://host:port`` -> ``ws://host:port/pty`` (https -> wss)."""
    parts = urlsplit(envd_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + PTY_PATH, "", ""))


def pty_input(data: bytes | str) -> dict[str, str]:
    """Text as text; bytes that are not UTF-8 as base64."""
    if isinstance(data, str):
        return {"type": PTY_INPUT, "data": data}
    try:
        return {"type": PTY_INPUT, "data": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"type": PTY_INPUT, "b64": base64.b64encode(data).decode("ascii")}


def pty_start(
    cols: int,
    rows: int,
    *,
    tag: str | None = None,
    cmd: str | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"type": PTY_START, "cols": cols, "rows": rows}
    for key, value in (("cmd", cmd), ("args", args), ("env", env), ("cwd", cwd), ("tag", tag)):
        if value is not None:
            message[key] = value
    return message


def pty_connect(tag: str) -> dict[str, str]:
    return {"type": PTY_CONNECT, "tag": tag}


def pty_resize(cols: int, rows: int) -> dict[str, Any]:
    return {"type": PTY_RESIZE, "cols": cols, "rows": rows}


def pty_kill(signal: str | int | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"type": PTY_KILL}
    if signal is not None:
        message["signal"] = signal
    return message
