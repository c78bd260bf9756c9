"""Learn the capsule's identity from the host's metadata service and publish it.

The source is polled because a capsule restored from a snapshot (or cloned from one) wakes
up with the identity of the original until the host's answer says otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("envd.metadata")

MAX_METADATA_BYTES = 64 * 1024
SANDBOX_ID_FILE = ".WRENN_SANDBOX_ID"
TEMPLATE_ID_FILE = ".WRENN_TEMPLATE_ID"


class MetadataError(ValueError):
    pass


@dataclass(frozen=True)
class Metadata:
    instance_id: str | None = None
    template_id: str | None = None
    access_token: str | None = None


def _text(obj: dict[str, object], *keys: str) -> str | None:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value:
            return value
        if value is not None and not isinstance(value, str):
            log.warning(
                "metadata field %r is a %s, not a string; ignored", key, type(value).__name__
            )
    return None


def parse_metadata(raw: bytes) -> Metadata:
    """One JSON object; unknown fields are ignored, missing or mistyped ones stay None."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MetadataError(f"metadata is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise MetadataError(f"metadata is a JSON {type(obj).__name__}, not an object")
    return Metadata(
        instance_id=_text(obj, "instanceID"),
        template_id=_text(obj, "templateID", "envID"),
        access_token=_text(obj, "accessToken"),
    )


Fetch = Callable[[], Awaitable[bytes]]


def tcp_source(host: str, port: int, timeout: float = 2.0) -> Fetch:
    async def fetch() -> bytes:
        async def read_all() -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            try:
                data = await reader.read(MAX_METADATA_BYTES + 1)
                chunks = [data]
                total = len(data)
                while data and total <= MAX_METADATA_BYTES:
                    data = await reader.read(MAX_METADATA_BYTES + 1 - total)
                    chunks.append(data)
                    total += len(data)
                if total > MAX_METADATA_BYTES:
                    raise MetadataError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
                return b"".join(chunks)
            finally:
                writer.close()

        async with asyncio.timeout(timeout):
            return await read_all()

    return fetch


def file_source(path: Path) -> Fetch:
    async def fetch() -> bytes:
        with open(path, "rb") as fh:
            data = fh.read(MAX_METADATA_BYTES + 1)
        if len(data) > MAX_METADATA_BYTES:
            raise MetadataError(f"metadata larger than {MAX_METADATA_BYTES} bytes")
        return data

    return fetch


def parse_source(spec: str) -> Fetch:
    """``tcp:HOST:PORT`` or ``file:PATH``."""
    kind, sep, rest = spec.partition(":")
    if sep and kind == "tcp":
        host, sep, port = rest.rpartition(":")
        if sep and host and port.isascii() and port.isdigit() and 0 < int(port) < 65536:
            return tcp_source(host.strip("[]"), int(port))
    elif sep and kind == "file" and rest:
        return file_source(Path(rest))
    raise ValueError(f"metadata source must be tcp:HOST:PORT or file:PATH, not {spec!r}")


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class IdentityPublisher:
    """Writes the IDs to files in the run directory whenever they change."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._written: dict[str, str] = {}

    def publish(self, sandbox_id: str | None, template_id: str | None) -> None:
        for name, value in ((SANDBOX_ID_FILE, sandbox_id), (TEMPLATE_ID_FILE, template_id)):
            if value is None or self._written.get(name) == value:
                continue
            try:
                write_atomic(self.run_dir / name, value)
            except OSError as exc:
                log.error("writing %s failed: %s", self.run_dir / name, exc)
                continue
            self._written[name] = value


class MetadataPoller:
    def __init__(
        self,
        fetch: Fetch,
        apply: Callable[[Metadata], None],
        interval: float = 5.0,
    ) -> None:
        self.fetch = fetch
        self.apply = apply
        self.interval = interval
        self.polls = 0
        self.failures = 0
        self.last_error: str | None = None

    async def poll_once(self) -> Metadata | None:
        self.polls += 1
        try:
            metadata = parse_metadata(await self.fetch())
        except (OSError, TimeoutError, MetadataError) as exc:
            self.failures += 1
            message = str(exc) or type(exc).__name__
            # A source that stays down would otherwise log the same line every few seconds.
            if message != self.last_error:
                log.warning("metadata poll failed: %s", message)
            self.last_error = message
            return None
        self.last_error = None
        self.apply(metadata)
        return metadata

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)
