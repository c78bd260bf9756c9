"""Directory watches on Linux inotify, through ctypes (the guest has no inotify wheel).

Each watch owns one inotify descriptor read on the event loop. Events are reported the way
E2B's envd (fsnotify) names them: created or moved in -> CREATE, modified -> WRITE,
deleted -> REMOVE, moved out -> RENAME, attributes -> CHMOD, with ``name`` relative to the
watched directory. A recursive watch follows directories created or moved in later.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("envd.connect.watch")

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

WATCH_MASK = (
    IN_MODIFY | IN_ATTRIB | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE | IN_ONLYDIR
)
EVENT_HEADER = struct.Struct("iIII")

CREATE, WRITE, REMOVE, RENAME, CHMOD = 1, 2, 3, 4, 5
EVENT_TYPES = {
    CREATE: "EVENT_TYPE_CREATE",
    WRITE: "EVENT_TYPE_WRITE",
    REMOVE: "EVENT_TYPE_REMOVE",
    RENAME: "EVENT_TYPE_RENAME",
    CHMOD: "EVENT_TYPE_CHMOD",
}


class WatchUnavailable(Exception):
    pass


@dataclass(frozen=True)
class FsEvent:
    name: str
    """Relative to the watched directory, "/"-separated."""
    kind: int
    real: Path


def _kind(mask: int) -> int | None:
    if mask & (IN_CREATE | IN_MOVED_TO):
        return CREATE
    if mask & IN_DELETE:
        return REMOVE
    if mask & IN_MOVED_FROM:
        return RENAME
    if mask & IN_MODIFY:
        return WRITE
    if mask & IN_ATTRIB:
        return CHMOD
    return None


class _Libc:
    def __init__(self) -> None:
        # Imported on first watch: envd's start-up (cold boots) does not pay for it.
        import ctypes

        self.get_errno = ctypes.get_errno
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.init1 = libc.inotify_init1
            self.add_watch = libc.inotify_add_watch
        except (OSError, AttributeError) as exc:
            raise WatchUnavailable(f"inotify is not available: {exc}") from None
        self.init1.argtypes = [ctypes.c_int]
        self.init1.restype = ctypes.c_int
        self.add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        self.add_watch.restype = ctypes.c_int


_libc: _Libc | None = None


def _lib() -> _Libc:
    global _libc
    if _libc is None:
        _libc = _Libc()
    return _libc


class DirectoryWatch:
    """Watches ``root`` (an existing directory); calls ``sink`` per event, ``on_end`` once
    the directory itself is gone."""

    def __init__(
        self,
        root: Path,
        recursive: bool,
        sink: Callable[[FsEvent], None],
        on_end: Callable[[], None],
    ) -> None:
        lib = _lib()
        self.root = root
        self.recursive = recursive
        self._sink = sink
        self._on_end = on_end
        self._dirs: dict[int, str] = {}
        fd = lib.init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = lib.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self._fd = fd
        self._closed = False
        try:
            self._add(root, "")
            if recursive:
                self._add_tree(root, "")
        except BaseException:
            os.close(fd)
            self._closed = True
            raise
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(fd, self._readable)

    def _add(self, path: Path, rel: str) -> None:
        lib = _lib()
        wd = lib.add_watch(self._fd, os.fsencode(path), WATCH_MASK)
        if wd < 0:
            err = lib.get_errno()
            if rel == "":
                raise OSError(err, os.strerror(err), str(path))
            # A subdirectory that went away or cannot be read is simply not watched.
            log.debug("not watching %s: %s", path, os.strerror(err))
            return
        self._dirs[wd] = rel

    def _add_tree(self, directory: Path, rel: str) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            return
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                child = f"{rel}/{entry.name}" if rel else entry.name
                self._add(Path(entry.path), child)
                self._add_tree(Path(entry.path), child)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EINTR:
                log.warning("reading inotify events failed: %s", exc)
            return
        offset = 0
        while offset + EVENT_HEADER.size <= len(data):
            wd, mask, _cookie, length = EVENT_HEADER.unpack_from(data, offset)
            raw = data[offset + EVENT_HEADER.size : offset + EVENT_HEADER.size + length]
            offset += EVENT_HEADER.size + length
            self._handle(wd, mask, os.fsdecode(raw.rstrip(b"\0")))

    def _handle(self, wd: int, mask: int, name: str) -> None:
        if mask & IN_Q_OVERFLOW:
            log.warning("inotify queue overflowed for %s: events were lost", self.root)
            return
        rel_dir = self._dirs.get(wd)
        if rel_dir is None:
            return
        if mask & IN_IGNORED:
            del self._dirs[wd]
            if rel_dir == "":
                self._on_end()
            return
        if not name:
            return
        rel = f"{rel_dir}/{name}" if rel_dir else name
        real = self.root / rel
        if self.recursive and mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
            self._add(real, rel)
            self._add_tree(real, rel)
        kind = _kind(mask)
        if kind is not None:
            self._sink(FsEvent(rel, kind, real))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
