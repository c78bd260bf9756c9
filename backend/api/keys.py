"""The agent API's key: generated on first use, kept in the config dir, readable by its owner."""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from pathlib import Path

from starlette.requests import HTTPConnection

from backend.config import Paths

KEY_FILE = "api-key"
KEY_PREFIX = "wrenn_"


def key_path(paths: Paths) -> Path:
    return paths.config / KEY_FILE


def new_key() -> str:
    return KEY_PREFIX + secrets.token_hex(20)


def write_key(paths: Paths, key: str, *, replace: bool = True) -> None:
    """Store ``key``; with ``replace=False`` an existing key wins (two first runs at once)."""
    path = key_path(paths)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{KEY_FILE}.{os.getpid()}.tmp")
    # Created 0600 from the start: the key is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_key(paths: Paths) -> str | None:
    path = key_path(paths)
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return None
    if path.stat().st_mode & 0o077:
        path.chmod(0o600)
    return key or None


def load_or_create_key(paths: Paths) -> str:
    key = read_key(paths)
    if key is None:
        # An empty file is replaced; a key another process just wrote is kept.
        write_key(paths, new_key(), replace=key_path(paths).exists())
        key = read_key(paths)
        assert key is not None
    return key


def rotate_key(paths: Paths) -> str:
    key = new_key()
    write_key(paths, key)
    return key


def key_matches(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def given_key(connection: HTTPConnection) -> str | None:
    """The key a request (or WebSocket handshake) carries: ``X-API-Key`` (E2B's and Wrenn's
    SDKs) or ``Authorization: Bearer``."""
    given = connection.headers.get("x-api-key")
    if given is None:
        scheme, _, token = connection.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    return given
