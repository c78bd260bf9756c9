"""Sparse file copies and durable writes: guest RAM files are mostly holes, and holes must stay
holes. Used by snapshots (backend/capsules) and image builds (backend/image) alike.

The checksum is taken over the data extents (offset, length, bytes) in the same pass as the copy,
so checksumming a snapshot costs no second read. A hole and a run of zeros hash differently,
which is fine: both sides use the same extent map of the same file.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from backend.libc import libc

CHUNK = 8 << 20


@dataclass(frozen=True)
class CopyResult:
    size: int
    allocated: int
    sha256: str


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of every data region, by SEEK_DATA/SEEK_HOLE."""
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end - start))
        offset = end
    return extents


def _hash_extent(digest: hashlib._Hash, offset: int, length: int) -> None:
    digest.update(offset.to_bytes(8, "little") + length.to_bytes(8, "little"))


def _data_chunks(fd: int, size: int, digest: hashlib._Hash) -> Iterator[tuple[int, bytes]]:
    """Every data chunk of the file with its offset, fed to `digest` as the extent checksum."""
    for offset, length in data_extents(fd, size):
        _hash_extent(digest, offset, length)
        done = 0
        while done < length:
            chunk = os.pread(fd, min(CHUNK, length - done), offset + done)
            if not chunk:
                break
            digest.update(chunk)
            yield offset + done, chunk
            done += len(chunk)


def sparse_copy(src: Path, dst: Path, *, fsync: bool = True, truncate: bool = True) -> CopyResult:
    """Copy `src` to `dst` keeping holes; returns sizes and the extent checksum of `src`.

    `truncate=False` writes into an existing all-holes file of the right size without cutting it
    first (a VMM may already have it mapped).
    """
    digest = hashlib.sha256()
    with src.open("rb") as fin:
        size = os.fstat(fin.fileno()).st_size
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else 0)
        fd_out = os.open(dst, flags, 0o600)
        try:
            os.ftruncate(fd_out, size)
            for offset, chunk in _data_chunks(fin.fileno(), size, digest):
                if os.pwrite(fd_out, chunk, offset) != len(chunk):
                    raise OSError(errno.ENOSPC, "short write", str(dst))
            if fsync:
                os.fsync(fd_out)
            allocated = os.fstat(fd_out).st_blocks * 512
        finally:
            os.close(fd_out)
    return CopyResult(size=size, allocated=allocated, sha256=digest.hexdigest())


def punch_zero_pages(path: Path, page: int = 4096) -> None:
    """Turn every run of all-zero pages of `path` into a hole (the content reads the same).
    A filesystem that cannot punch holes leaves the file as it is."""
    zero = bytes(page)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        for offset, length in data_extents(fd, size):
            done = 0
            while done < length:
                chunk = os.pread(fd, min(CHUNK, length - done), offset + done)
                if not chunk:
                    break
                run_start = -1
                for i in range(0, len(chunk), page):
                    if chunk[i : i + page] == zero:
                        if run_start < 0:
                            run_start = i
                        continue
                    if run_start >= 0:
                        if not _punch(fd, offset + done + run_start, i - run_start):
                            return
                        run_start = -1
                if run_start >= 0 and not _punch(
                    fd, offset + done + run_start, len(chunk) - run_start
                ):
                    return
                done += len(chunk)
    finally:
        os.close(fd)


def _punch(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range of `fd` (False when the filesystem cannot)."""
    return int(libc().fallocate(fd, 0x01 | 0x02, offset, length)) == 0  # KEEP_SIZE|PUNCH_HOLE


def sparse_checksum(path: Path) -> str:
    """The extent checksum `sparse_copy` reports, computed from a file at rest."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        for _ in _data_chunks(f.fileno(), size, digest):
            pass
    return digest.hexdigest()


def create_holes(path: Path, size: int) -> None:
    """A new file of `size` bytes, all holes (replacing any file there)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def allocated_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """The plain SHA-256 of a whole file (small files: device state, manifests)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
