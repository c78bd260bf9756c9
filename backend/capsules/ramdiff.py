"""Clone RAM shared with an immutable template, and pauses that save only what differs.

Used by backend/capsules/snapshots.py: a capsule made from a template snapshot (an image's
warm snapshot or a user template) is a *clone* of it, and its pauses are diffs on it.

**The template** (`TemplateRam`): the template snapshot's guest RAM copied (sparsely) into a
memfd, then sealed against every change (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW |
F_SEAL_SEAL`). A clone's QEMU maps it privately (`memory-backend-file,share=off,
mem-path=/proc/<agent pid>/fd/<n>`): pages it never writes stay shared with every other clone;
a write copies that one page. QEMU 7.2 discards guest pages (free-page reporting, balloon) of
a file-backed block by punching a hole in the *file*: on the sealed memfd that fails (EPERM),
so a clone can never zero the template under the others.

**The pause** (`filter_stream`): the clone's RAM block is not `share=on`, so a migration puts
all of it in the stream. The filter copies QEMU 7.2's migration stream through unchanged except
that a PAGE record of the template's block (`mem0`) whose 4 KiB equal the template's page at
that offset is dropped; a following record that said CONTINUE ("same block as the last
record") is rewritten to name its block when the record it followed was dropped. Restoring: a
new QEMU whose mem0 is the same private mapping of the template loads the filtered stream;
pages absent from it keep the template's content.

The stream format is QEMU 7.2's (migration/savevm.c, migration/ram.c):

    be32 magic "QEVM", be32 version 3
    [0x07 configuration: be32 len, machine name, subsections (0x05 u8 len idstr be32 ver body)]
    sections: 0x01 START / 0x04 FULL: be32 section id, u8 len idstr, be32 instance, be32 version
              0x02 PART / 0x03 END:    be32 section id
              each body followed by an optional footer 0x7e be32 section id
    RAM body: records `be64 addr|flags`, flags in the low 12 bits:
              MEM_SIZE 0x04 (block list: u8 len idstr, be64 used length[, be64 gpa if
              x-ignore-shared]), ZERO 0x02 (+1 byte), PAGE 0x08 (+4096 bytes),
              EOS 0x10 (end of body); ZERO/PAGE name their block (u8 len idstr) unless
              CONTINUE 0x20 is set
    0x00 EOF, then 0x06 VM description: be32 len, JSON

Iterable (RAM) sections all come before the device sections (`FULL`), so from the first FULL
section on the filter copies the rest through and checks that it ends with the EOF marker and
a complete VM description: a truncated stream is an error, never a silently short file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from backend import sparse
from backend.libc import libc as c_library

if TYPE_CHECKING:
    from backend.runtime.base import VM

PAGE_SIZE = 4096
"""x86's TARGET_PAGE_SIZE: the unit of RAM records."""
ZERO_PAGE = bytes(PAGE_SIZE)

QEMU_VM_FILE_MAGIC = 0x5145564D
QEMU_VM_FILE_VERSION = 3

QEMU_VM_EOF = 0x00
QEMU_VM_SECTION_START = 0x01
QEMU_VM_SECTION_PART = 0x02
QEMU_VM_SECTION_END = 0x03
QEMU_VM_SECTION_FULL = 0x04
QEMU_VM_SUBSECTION = 0x05
QEMU_VM_VMDESCRIPTION = 0x06
QEMU_VM_CONFIGURATION = 0x07
QEMU_VM_COMMAND = 0x08
QEMU_VM_SECTION_FOOTER = 0x7E

RAM_SAVE_FLAG_FULL = 0x01
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
FLAG_MASK = PAGE_SIZE - 1

RAM_SAVE_FLAG_PACK_XOR = 0x400
"""Packed diffs only (never sent to QEMU): 4096 bytes, the page XOR the template's page at the
same offset (mostly zeros when the guest changed a few words of it)."""
RAM_SAVE_FLAG_PACK_COPY = 0x800
"""Packed diffs only: be64, the offset of a template page with exactly this content (a file
page the guest read again into another frame)."""

PACK_MAGIC = b"WRNDIFF1"
_FRAME_DEFLATE = ord("Z")
_FRAME_RAW = ord("R")
_FRAME_END = ord("E")
_FRAME_MAX = 1 << 20
PACK_LEVEL = 1
"""zlib's fastest: level 6 made an idle clone's diff 75 KiB instead of 94 KiB (its disk overlay
is ~850 KiB) for 25 ms more of each pause."""
COMPRESSIBLE_ZEROS = 512
"""A page with at least this many zero bytes (or whose XOR with the template's page has) goes
through deflate; others are stored as they are (random or already-compressed data would only
cost deflate's time)."""
NEARLY_SAME_ZEROS = 3584
"""A page whose XOR with the template's page has this many zero bytes (7/8) is packed as that
XOR at once. Measured on a clone paused after reading 200 MB and dropping its cache: 313 KiB,
against 351 KiB looking for a moved page first and 445-512 KiB with 512-3072 here."""

TEMPLATE_BLOCK = b"mem0"
MAX_TAIL = 64 << 20
"""Device state after the RAM sections is copied in memory: refuse more than this."""

SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class StreamError(Exception):
    """The migration stream is truncated, corrupt, or uses a feature the filter cannot pass."""


# -- the template ------------------------------------------------------------------------------


class TemplateRam:
    """A template's guest RAM in a sealed memfd, owned by this (the agent's) process.

    `mem_path` is what a clone's QEMU gets as `mem-path` (with `share=off`); QEMU opens it
    before dropping privileges (`-runas`). Its pages are read with pread (`template[a:b]`),
    never through a mapping: a fault on a hole of a memfd allocates a zero page in it, where a
    read() of a hole allocates nothing (checksumming through an mmap grew the template from
    102 to 256 MiB).
    """

    def __init__(self, fd: int, size: int, sha256: str, zero: bytearray | None = None) -> None:
        self.fd = fd
        self.size = size
        self.sha256 = sha256
        self._zero = zero
        """1 for each page that reads as zeros (a hole, or data all zero)."""
        self._index: dict[int, int] | None = None
        self._index_lock = threading.Lock()
        self._indexing: threading.Thread | None = None

    def page_index(self) -> dict[int, int]:
        """`page_index` of this template, built once (0.2-0.3 s for 86 MiB of data here)."""
        with self._index_lock:
            if self._index is None:
                if self.fd < 0:  # closed (a base forgotten while this was being asked for)
                    return {}
                self._index = page_index(self, self._zero)
            return self._index

    def _build_index(self) -> None:
        with contextlib.suppress(OSError):
            self.page_index()

    def page_index_if_ready(self) -> dict[int, int] | None:
        """The index if it is built; else None, and it is built in the background (a pause
        does not wait for it: without it a moved page is only deflated)."""
        if self._index is not None:
            return self._index
        if self._indexing is None:
            self._indexing = threading.Thread(
                target=self._build_index, name="wrenn-page-index", daemon=True
            )
            self._indexing.start()
        return None

    def is_zero_page(self, page: int) -> bool:
        if self._zero is not None:
            return bool(self._zero[page])
        offset = page * PAGE_SIZE
        return self[offset : offset + PAGE_SIZE] == ZERO_PAGE

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, span: slice) -> bytes:
        start, stop, _ = span.indices(self.size)
        return os.pread(self.fd, max(0, stop - start), start)

    @classmethod
    def from_file(cls, ram_file: Path, name: str = "wrenn-template") -> TemplateRam:
        """Copy `ram_file` (sparse: holes stay holes) into a new memfd and seal it. The
        returned sha256 is `backend.sparse`'s extent checksum of the source (what a snapshot
        manifest records as `ram_sha256`)."""
        fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        try:
            with ram_file.open("rb") as src:
                size = os.fstat(src.fileno()).st_size
                if size % PAGE_SIZE:
                    raise ValueError(f"{ram_file} is {size} bytes, not whole pages")
                os.ftruncate(fd, size)
                digest = hashlib.sha256()
                zero = bytearray(b"\x01") * (size // PAGE_SIZE)
                for offset, chunk in sparse._data_chunks(src.fileno(), size, digest):
                    if os.pwrite(fd, chunk, offset) != len(chunk):
                        raise OSError(errno.ENOSPC, "short write into the template memfd")
                    first = offset // PAGE_SIZE
                    for i in range(0, len(chunk), PAGE_SIZE):
                        if chunk[i : i + PAGE_SIZE] != ZERO_PAGE:
                            zero[first + i // PAGE_SIZE] = 0
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
            return cls(fd, size, digest.hexdigest(), zero)
        except BaseException:
            os.close(fd)
            raise

    @property
    def mem_path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self.fd}"

    def seals(self) -> int:
        return fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)

    def allocated_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def trim(self) -> int:
        """Give back the pages that reads of the template's holes allocated; returns the bytes
        freed. A fault on a hole of a memfd allocates a zeroed page in it, and QEMU's save of a
        clone reads every page, as does a clone's first write to a page (the kernel reads the
        file page to copy it): without this the template grows to the guest's RAM size.

        Those pages are clean, so reclaim can drop them; the template's own pages were written
        (dirty) and never are (without swap; with swap they would be swapped, not lost). Our
        own read-only shared mapping maps the resident hole pages (mincore says which) and
        MADV_PAGEOUT reclaims them; a page a clone maps as well is left alone by the kernel."""
        if self._zero is None or not self.size:
            return 0
        before = self.allocated_bytes()
        libc = c_library()
        addr = libc.mmap(None, self.size, _PROT_READ, _MAP_SHARED, self.fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return 0
        try:
            pages = self.size // PAGE_SIZE
            resident = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), self.size, resident) != 0:
                return 0
            # pages both resident and a hole of the template, as runs (in C, not a Python loop
            # over every page: this runs after each clone's pause, beside its next resume)
            both = int.from_bytes(bytes(resident).translate(_LOW_BIT), "little") & int.from_bytes(
                self._zero, "little"
            )
            runs = [m.span() for m in re.finditer(b"\x01+", both.to_bytes(pages, "little"))]
            for start, end in runs:
                # map them into our mapping (they are resident: nothing is allocated), so that
                # MADV_PAGEOUT, which works on what a mapping maps, reclaims them
                at, length = addr + start * PAGE_SIZE, (end - start) * PAGE_SIZE
                if libc.madvise(ctypes.c_void_p(at), length, _MADV_POPULATE_READ) != 0:
                    for page in range(start, end):  # a kernel before 5.14
                        ctypes.c_char.from_address(addr + page * PAGE_SIZE).value  # noqa: B018
            if runs:
                libc.madvise(ctypes.c_void_p(addr), self.size, _MADV_PAGEOUT)
        finally:
            libc.munmap(ctypes.c_void_p(addr), self.size)
        return max(0, before - self.allocated_bytes())

    def checksum(self) -> str:
        """sha256 of the whole content (holes read as zeros)."""
        digest = hashlib.sha256()
        for offset in range(0, self.size, 1 << 20):
            digest.update(self[offset : offset + (1 << 20)])
        return digest.hexdigest()

    def close(self) -> None:
        with self._index_lock:  # not under an index being built from it
            os.close(self.fd)
            self.fd = -1


_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MADV_PAGEOUT = 21
_MADV_POPULATE_READ = 22
_LOW_BIT = bytes(i & 1 for i in range(256))
"""mincore's byte per page: bit 0 says resident, the other bits are reserved."""


class RamBases:
    """The sealed template memfds of this process, one per base RAM file and checksum, kept
    open for the life of the process (a clone's QEMU opens its base by path when it starts;
    once mapped, the memfd lives as long as any clone maps it, whatever this process does).

    Each process that starts clones (the dashboard, `serve`, the CLI) has its own copy of a
    base: clones started by one process share with each other, not with another's."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], TemplateRam] = {}
        self._loading: dict[tuple[str, str], asyncio.Lock] = {}

    async def open(self, ram_file: Path, sha256: str) -> TemplateRam:
        """The sealed copy of `ram_file`, which must have the extent checksum `sha256`
        (BaseChanged otherwise: nothing is kept open then)."""
        key = (str(ram_file.resolve()), sha256)
        found = self._open.get(key)
        if found is not None:
            return found
        lock = self._loading.setdefault(key, asyncio.Lock())
        async with lock:
            found = self._open.get(key)
            if found is not None:
                return found
            try:
                ram = await asyncio.to_thread(
                    TemplateRam.from_file, ram_file, f"wrenn-base-{sha256[:12]}"
                )
            except FileNotFoundError:
                raise BaseChanged(f"{ram_file} is gone") from None
            if ram.sha256 != sha256:
                ram.close()
                raise BaseChanged(f"{ram_file} has changed (checksum mismatch)")
            self._open[key] = ram
            return ram

    def forget(self, directory: Path) -> None:
        """Close the bases under `directory` (a template removed, a snapshot discarded): the
        clones that map one keep it; new clones open the files again."""
        root = str(directory.resolve())
        for key in [k for k in self._open if k[0].startswith(root + os.sep)]:
            self._open.pop(key).close()

    def allocated_bytes(self) -> int:
        return sum(ram.allocated_bytes() for ram in self._open.values())

    async def trim(self) -> int:
        """`TemplateRam.trim` every base (after a clone's pause read all of its pages)."""
        freed = 0
        for ram in list(self._open.values()):
            freed += await asyncio.to_thread(ram.trim)
        return freed

    def allocated_for(self, ram_file: Path) -> int | None:
        """Bytes held in memory for `ram_file` (None: not open in this process)."""
        path = str(ram_file.resolve())
        held = [ram.allocated_bytes() for (p, _), ram in self._open.items() if p == path]
        return sum(held) if held else None

    def close(self) -> None:
        for ram in self._open.values():
            ram.close()
        self._open.clear()


class BaseChanged(Exception):
    """A base RAM file is missing or no longer what a clone or a diff was made on."""


class PageSource(Protocol):
    """The template's RAM as the filter reads it: bytes, an mmap, or a TemplateRam."""

    def __len__(self) -> int: ...

    def __getitem__(self, span: slice, /) -> bytes: ...


# -- the stream filter -------------------------------------------------------------------------


@dataclass
class FilterStats:
    input_bytes: int = 0
    output_bytes: int = 0
    pages: int = 0
    """PAGE records of the template's block in the input."""
    pages_dropped: int = 0
    pages_copied: int = 0
    """Packing: pages kept as a reference to a template page with the same content."""
    pages_xor: int = 0
    """Packing: pages kept as their XOR with the template's page, deflated."""
    pages_stored: int = 0
    """Packing: pages kept as they are, not deflated (they would not shrink)."""
    zero_dropped: int = 0
    """ZERO records of the template's block dropped: the template's page is zero as well."""
    zero_records: int = 0
    other_pages: int = 0
    """PAGE records of other blocks (ROMs), always kept."""
    blocks: dict[str, int] = field(default_factory=dict)
    """The RAM blocks the stream declares, with their sizes."""


class _Reader:
    def __init__(self, src: BinaryIO | _UnpackReader, chunk: int = 1 << 20) -> None:
        self._src = src
        self._chunk = chunk
        self._buf = b""
        self._pos = 0
        self.consumed = 0

    def _fill(self, n: int) -> bool:
        while len(self._buf) - self._pos < n:
            more = self._src.read(max(self._chunk, n))
            if not more:
                return False
            self._buf = self._buf[self._pos :] + more
            self._pos = 0
        return True

    def read(self, n: int, what: str) -> bytes:
        if not self._fill(n):
            raise StreamError(f"migration stream truncated at byte {self.consumed} ({what})")
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        self.consumed += n
        return data

    def peek(self) -> int | None:
        if not self._fill(1):
            return None
        return self._buf[self._pos]

    def rest(self, limit: int) -> bytes:
        parts = [self._buf[self._pos :]]
        size = len(parts[0])
        self._buf, self._pos = b"", 0
        while True:
            more = self._src.read(self._chunk)
            if not more:
                break
            size += len(more)
            if size > limit:
                raise StreamError(f"device state after the RAM sections exceeds {limit} bytes")
            parts.append(more)
        self.consumed += size
        return b"".join(parts)

    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def be32(self, what: str) -> int:
        return int.from_bytes(self.read(4, what), "big")

    def be64(self, what: str) -> int:
        return int.from_bytes(self.read(8, what), "big")


class _Writer:
    def __init__(self, dst: BinaryIO, flush_at: int = 1 << 20) -> None:
        self._dst = dst
        self._parts: list[bytes] = []
        self._pending = 0
        self._flush_at = flush_at
        self.written = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._pending += len(data)
        self.written += len(data)
        if self._pending >= self._flush_at:
            self.flush()

    @property
    def size(self) -> int:
        """Bytes written to the destination."""
        return self.written

    def flush(self) -> None:
        if self._parts:
            self._dst.write(b"".join(self._parts))
            self._parts, self._pending = [], 0


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


def _page_key(page: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(page, digest_size=8).digest(), "little")


def page_index(base: PageSource, zero: bytearray | None = None) -> dict[int, int]:
    """Where each distinct non-zero page of `base` is: a 64-bit hash of its content -> its
    offset (a hit is compared byte for byte before it is used)."""
    index: dict[int, int] = {}
    chunk = 1 << 20
    for offset in range(0, len(base), chunk):
        data = base[offset : offset + chunk]
        for i in range(0, len(data) - PAGE_SIZE + 1, PAGE_SIZE):
            at = offset + i
            if zero is not None and zero[at // PAGE_SIZE]:
                continue
            page = data[i : i + PAGE_SIZE]
            if zero is None and page == ZERO_PAGE:
                continue
            index.setdefault(_page_key(page), at)
    return index


class _PackWriter(_Writer):
    """The output of a packing filter: `PACK_MAGIC`, then frames (`u8 kind, be32 length,
    bytes`): `Z` continues one deflate stream, `R` is stored as is, and `E` (`be64`: the
    unpacked length) ends the file. The unpacked stream is every frame's bytes in order, Z
    frames inflated. `write` deflates; `write_raw` stores (data that would not shrink)."""

    def __init__(self, dst: BinaryIO) -> None:
        super().__init__(dst)
        self._deflate = zlib.compressobj(PACK_LEVEL, zlib.DEFLATED, -15)
        self._deflated: list[bytes] = []
        self._raw: list[bytes] = []
        self._raw_bytes = 0
        self._dirty = False
        """Bytes went into deflate since its last flush."""
        self._dst.write(PACK_MAGIC)
        self.packed = len(PACK_MAGIC)

    def write(self, data: bytes) -> None:
        self._end_raw()
        self.written += len(data)
        out = self._deflate.compress(data)
        self._dirty = True
        if out:
            self._deflated.append(out)
            self._pending += len(out)
            if self._pending >= _FRAME_MAX:
                self._frame(_FRAME_DEFLATE, b"".join(self._deflated))
                self._deflated, self._pending = [], 0

    def write_raw(self, data: bytes) -> None:
        if self._dirty:
            # what went into deflate must come out before these bytes
            self._deflated.append(self._deflate.flush(zlib.Z_SYNC_FLUSH))
            self._dirty = False
        if self._deflated:
            self._frame(_FRAME_DEFLATE, b"".join(self._deflated))
            self._deflated, self._pending = [], 0
        self.written += len(data)
        self._raw.append(data)
        self._raw_bytes += len(data)
        if self._raw_bytes >= _FRAME_MAX:
            self._end_raw()

    def _end_raw(self) -> None:
        if self._raw:
            self._frame(_FRAME_RAW, b"".join(self._raw))
            self._raw, self._raw_bytes = [], 0

    @property
    def size(self) -> int:
        return self.packed

    def flush(self) -> None:
        """The end of the stream (a packed file is written in one go, never flushed midway)."""
        self._end_raw()
        self._deflated.append(self._deflate.flush(zlib.Z_FINISH))
        self._frame(_FRAME_DEFLATE, b"".join(self._deflated))
        self._deflated = []
        self._dst.write(bytes([_FRAME_END]) + self.written.to_bytes(8, "big"))
        self.packed += 9

    def _frame(self, kind: int, data: bytes) -> None:
        for i in range(0, len(data), _FRAME_MAX):
            part = data[i : i + _FRAME_MAX]
            self._dst.write(bytes([kind]) + len(part).to_bytes(4, "big"))
            self._dst.write(part)
            self.packed += 5 + len(part)


class _UnpackReader:
    """Reads a packed file (see _PackWriter) as the stream it was packed from. StreamError
    when it is truncated or corrupt."""

    def __init__(self, src: BinaryIO) -> None:
        self._src = src
        if self._exact(len(PACK_MAGIC), "header") != PACK_MAGIC:
            raise StreamError("not a packed RAM diff (bad magic)")
        self._inflate = zlib.decompressobj(-15)
        self._tail = b""
        """Deflated input not yet inflated (inflating is bounded per read)."""
        self._out = 0
        self._done = False

    def _exact(self, n: int, what: str) -> bytes:
        data = self._src.read(n)
        while len(data) < n:
            more = self._src.read(n - len(data))
            if not more:
                raise StreamError(f"packed RAM diff truncated ({what})")
            data += more
        return data

    def read(self, n: int = -1) -> bytes:
        limit = _FRAME_MAX if n is None or n < 0 else max(n, 1)
        while not self._done:
            if self._tail:
                out = self._inflate.decompress(self._tail, limit)
                self._tail = self._inflate.unconsumed_tail
            else:
                out = self._frame(limit)
            if out:
                self._out += len(out)
                return out
        return b""

    def _frame(self, limit: int) -> bytes:
        head = self._exact(1, "frame")[0]
        if head == _FRAME_END:
            length = int.from_bytes(self._exact(8, "end"), "big")
            if not self._inflate.eof or self._inflate.unused_data:
                raise StreamError("packed RAM diff corrupt: its deflate stream does not end")
            if length != self._out:
                raise StreamError(
                    f"packed RAM diff corrupt: {self._out} bytes unpacked, {length} packed"
                )
            if self._src.read(1):
                raise StreamError("packed RAM diff corrupt: bytes after its end")
            self._done = True
            return b""
        size = int.from_bytes(self._exact(4, "frame length"), "big")
        if head not in (_FRAME_DEFLATE, _FRAME_RAW) or size > _FRAME_MAX:
            raise StreamError(f"packed RAM diff corrupt: frame {head:#x} of {size} bytes")
        data = self._exact(size, "frame")
        if head == _FRAME_RAW:
            return data
        try:
            out = self._inflate.decompress(data, limit)
        except zlib.error as exc:
            raise StreamError(f"packed RAM diff corrupt: {exc}") from None
        self._tail = self._inflate.unconsumed_tail
        return out


class _Filter:
    def __init__(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        base: PageSource,
        block: bytes,
        sink: Callable[[int, bytes], None] | None = None,
        *,
        pack: bool = False,
        unpack: bool = False,
    ):
        self.r = _Reader(_UnpackReader(src) if unpack else src)
        self.w: _Writer = _PackWriter(dst) if pack else _Writer(dst)
        self.pack = pack
        self.unpack = unpack
        """Reading a packed diff: its PACK_XOR/PACK_COPY records become PAGE records again and
        nothing is dropped (the output is the filtered stream the diff was packed from)."""
        self._index: dict[int, int] | None = None
        self.base = base
        self.sink = sink
        """When set, every record of `block` goes to it (offset, 4 KiB) instead of the output."""
        self.block = block
        self.stats = FilterStats()
        self.ignore_shared = False
        self.sizes: dict[bytes, int] = {}
        self.sections: dict[int, bytes] = {}
        self.in_block: bytes | None = None
        """The block a CONTINUE record in the input refers to."""
        self.out_block: bytes | None = None
        """The block a CONTINUE record in the output refers to."""
        self.covered = bytearray((len(base) + PAGE_SIZE - 1) // PAGE_SIZE)
        """Pages of the template's block that some record of the input named."""
        self.kept = bytearray((len(base) + PAGE_SIZE - 1) // PAGE_SIZE)
        """Pages of the template's block already in the output: a later copy of such a page
        (a live migration resending it) must never be dropped, or the earlier one would win."""

    def run(self) -> FilterStats:
        r, w = self.r, self.w
        head = r.read(8, "file header")
        magic, version = struct.unpack(">II", head)
        if magic != QEMU_VM_FILE_MAGIC:
            raise StreamError("not a QEMU migration stream (bad magic)")
        if version != QEMU_VM_FILE_VERSION:
            raise StreamError(f"unsupported migration stream version {version}")
        w.write(head)
        while True:
            kind = r.u8("section type")
            if kind == QEMU_VM_CONFIGURATION:
                w.write(bytes([kind]))
                self._configuration()
            elif kind in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                self._iterable(kind)
            elif kind in (QEMU_VM_SECTION_FULL, QEMU_VM_EOF):
                self._tail(kind)
                break
            else:
                raise StreamError(
                    f"unexpected section type {kind:#x} at byte {r.consumed - 1} "
                    "(postcopy/COLO commands are not supported)"
                )
        w.flush()
        self.stats.input_bytes = r.consumed
        self.stats.output_bytes = w.size
        self.stats.blocks = {k.decode(errors="replace"): v for k, v in self.sizes.items()}
        return self.stats

    def _configuration(self) -> None:
        r, w = self.r, self.w
        raw = r.read(4, "configuration")
        length = int.from_bytes(raw, "big")
        if length > 256:
            raise StreamError(f"configuration names a machine of {length} bytes")
        w.write(raw + r.read(length, "machine name"))
        while r.peek() == QEMU_VM_SUBSECTION:
            head = r.read(2, "subsection")
            name = r.read(head[1], "subsection name")
            version = r.read(4, "subsection version")
            w.write(head + name + version)
            if name == b"configuration/capabilities":
                raw = r.read(4, "capability count")
                w.write(raw)
                for _ in range(int.from_bytes(raw, "big")):
                    n = r.read(1, "capability")
                    cap = r.read(n[0], "capability")
                    w.write(n + cap)
                    if cap == b"x-ignore-shared":
                        self.ignore_shared = True
            elif name == b"configuration/target-page-bits":
                raw = r.read(4, "target page bits")
                if int.from_bytes(raw, "big") != 12:
                    raise StreamError("the stream's target page size is not 4 KiB")
                w.write(raw)
            elif name == b"configuration/uuid":
                w.write(r.read(16, "uuid"))
            else:
                raise StreamError(f"unknown configuration subsection {name!r}")

    def _iterable(self, kind: int) -> None:
        r, w = self.r, self.w
        raw_id = r.read(4, "section id")
        section_id = int.from_bytes(raw_id, "big")
        header = bytes([kind]) + raw_id
        if kind == QEMU_VM_SECTION_START:
            n = r.read(1, "section name")
            name = r.read(n[0], "section name")
            header += n + name + r.read(8, "section instance/version")
            if name != b"ram":
                raise StreamError(f"unsupported iterable section {name!r}")
            self.sections[section_id] = name
        elif self.sections.get(section_id) != b"ram":
            raise StreamError(f"section {section_id} continues but never started")
        w.write(header)
        self._ram_body()
        if r.peek() == QEMU_VM_SECTION_FOOTER:
            footer = r.read(5, "section footer")
            if int.from_bytes(footer[1:], "big") != section_id:
                raise StreamError(f"section {section_id} ends with another section's footer")
            w.write(footer)

    def _ram_body(self) -> None:
        r, w = self.r, self.w
        while True:
            raw = r.read(8, "RAM record")
            value = int.from_bytes(raw, "big")
            flags = value & FLAG_MASK
            addr = value & ~FLAG_MASK
            kind = flags & ~RAM_SAVE_FLAG_CONTINUE
            if kind == RAM_SAVE_FLAG_EOS:
                w.write(raw)
                return
            if kind == RAM_SAVE_FLAG_MEM_SIZE:
                w.write(raw)
                self._block_list(addr)
                continue
            packed = kind in (RAM_SAVE_FLAG_PACK_XOR, RAM_SAVE_FLAG_PACK_COPY)
            if kind not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE) and not (
                packed and self.unpack
            ):
                raise StreamError(
                    f"unsupported RAM record flags {flags:#x} (compression/XBZRLE/RDMA are not "
                    "supported)"
                )
            name = b""
            if flags & RAM_SAVE_FLAG_CONTINUE:
                if self.in_block is None:
                    raise StreamError("a RAM record continues a block never named")
                block = self.in_block
            else:
                n = r.read(1, "RAM block name")
                name = n + r.read(n[0], "RAM block name")
                block = name[1:]
                self.in_block = block
            size = self.sizes.get(block)
            if size is None:
                raise StreamError(f"RAM record for undeclared block {block!r}")
            if addr + PAGE_SIZE > size:
                raise StreamError(f"RAM record at {addr:#x} is outside block {block!r}")
            if block == self.block:
                self.covered[addr // PAGE_SIZE] = 1
            if packed:
                if block != self.block:
                    raise StreamError(f"a packed record names block {block!r}")
                data = self._unpack_page(kind, addr)
                self.stats.pages += 1
                if self.sink is not None:
                    self.sink(addr, data)
                    continue
                as_page = addr | (flags & RAM_SAVE_FLAG_CONTINUE) | RAM_SAVE_FLAG_PAGE
                w.write(as_page.to_bytes(8, "big") + name + data)
                self.out_block = block
                continue
            base_page = b""
            if kind == RAM_SAVE_FLAG_ZERO:
                data = r.read(1, "zero page")
                self.stats.zero_records += 1
                if block == self.block and self.sink is not None:
                    self.sink(addr, data * PAGE_SIZE)
                    continue
                if (
                    block == self.block
                    and not self.unpack
                    and data == b"\x00"
                    and addr + PAGE_SIZE <= len(self.base)
                    and not self.kept[addr // PAGE_SIZE]
                    and self._base_zero(addr)
                ):
                    # the template's page is zero too (the guest freed it: it zeroes what
                    # it frees): nothing to restore
                    self.stats.zero_dropped += 1
                    continue
            elif block == self.block and self.sink is not None:
                self.stats.pages += 1
                self.sink(addr, r.read(PAGE_SIZE, "RAM page"))
                continue
            else:
                data = r.read(PAGE_SIZE, "RAM page")
                if block == self.block:
                    self.stats.pages += 1
                    page = addr // PAGE_SIZE
                    if addr + PAGE_SIZE <= len(self.base) and not self.unpack:
                        base_page = self.base[addr : addr + PAGE_SIZE]
                        if not self.kept[page] and base_page == data:
                            self.stats.pages_dropped += 1
                            continue
                else:
                    self.stats.other_pages += 1
            if block == self.block and addr + PAGE_SIZE <= len(self.base):
                self.kept[addr // PAGE_SIZE] = 1
            if flags & RAM_SAVE_FLAG_CONTINUE and self.out_block != block:
                # the record it continued was dropped: name the block
                raw = (value & ~RAM_SAVE_FLAG_CONTINUE).to_bytes(8, "big")
                name = bytes([len(block)]) + block
            if self.pack and kind == RAM_SAVE_FLAG_PAGE and block == self.block:
                self._pack_page(raw, name, addr, data, base_page)
            else:
                w.write(raw + name + data)
            self.out_block = block

    def _pack_page(self, raw: bytes, name: bytes, addr: int, data: bytes, base: bytes) -> None:
        """Write a kept page of the template's block in the cheapest of the packed forms."""
        w = self.w
        assert isinstance(w, _PackWriter)
        value = int.from_bytes(raw, "big") & ~RAM_SAVE_FLAG_PAGE
        # a page that changed a few words (most pages of an idle clone) goes as its XOR with
        # the template's page without looking further: then the index (built on first use,
        # ~0.2 s per 100 MiB of template) is not needed at all
        delta = b""
        delta_zeros = 0
        if len(base) == PAGE_SIZE and not self._base_zero(addr):
            delta = _xor(data, base)
            delta_zeros = delta.count(0)
            if delta_zeros >= NEARLY_SAME_ZEROS:
                self._put_xor(value, name, delta)
                return
        if self._index is None:
            ready = getattr(self.base, "page_index_if_ready", None)
            self._index = (ready() or {}) if ready is not None else page_index(self.base)
        source = self._index.get(_page_key(data))
        if source is not None and self.base[source : source + PAGE_SIZE] == data:
            self.stats.pages_copied += 1
            head = (value | RAM_SAVE_FLAG_PACK_COPY).to_bytes(8, "big")
            w.write(head + name + source.to_bytes(8, "big"))
            return
        # otherwise the page itself deflates better than a XOR that changed more than a few
        # words (measured: 313 KiB against 335 KiB choosing the form with more zero bytes)
        if data.count(0) >= COMPRESSIBLE_ZEROS:
            w.write(raw + name + data)
        elif delta_zeros >= COMPRESSIBLE_ZEROS:
            self._put_xor(value, name, delta)
        else:
            self.stats.pages_stored += 1
            w.write_raw(raw + name + data)

    def _put_xor(self, value: int, name: bytes, delta: bytes) -> None:
        self.stats.pages_xor += 1
        self.w.write((value | RAM_SAVE_FLAG_PACK_XOR).to_bytes(8, "big") + name + delta)

    def _unpack_page(self, kind: int, addr: int) -> bytes:
        r = self.r
        if addr + PAGE_SIZE > len(self.base):
            raise StreamError(f"packed record at {addr:#x} is outside the template")
        if kind == RAM_SAVE_FLAG_PACK_XOR:
            return _xor(r.read(PAGE_SIZE, "packed page"), self.base[addr : addr + PAGE_SIZE])
        source = r.be64("packed page source")
        if source % PAGE_SIZE or source + PAGE_SIZE > len(self.base):
            raise StreamError(f"packed record copies {source:#x}, outside the template")
        return self.base[source : source + PAGE_SIZE]

    def _base_zero(self, addr: int) -> bool:
        check = getattr(self.base, "is_zero_page", None)
        if check is not None:
            return bool(check(addr // PAGE_SIZE))
        return self.base[addr : addr + PAGE_SIZE] == ZERO_PAGE

    def _block_list(self, total: int) -> None:
        r, w = self.r, self.w
        while total > 0:
            n = r.read(1, "RAM block list")
            name = r.read(n[0], "RAM block list")
            raw = r.read(8, "RAM block size")
            length = int.from_bytes(raw, "big")
            if length == 0 or length > total:
                raise StreamError(f"RAM block {name!r} has an impossible size {length}")
            w.write(n + name + raw)
            if self.ignore_shared:
                w.write(r.read(8, "RAM block address"))
            self.sizes[name] = length
            total -= length
        if self.block in self.sizes and self.sizes[self.block] != len(self.base):
            raise StreamError(
                f"block {self.block!r} is {self.sizes[self.block]} bytes, "
                f"the template {len(self.base)}"
            )

    def _tail(self, kind: int) -> None:
        """Device sections to the end: copied through, checked to end with the EOF marker and
        a whole VM description (what QEMU 7.2 writes last)."""
        tail = bytes([kind]) + self.r.rest(MAX_TAIL)
        start = tail.rfind(b'{"page_size"')
        if start < 6 or tail[start - 6 : start - 4] != bytes([QEMU_VM_EOF, QEMU_VM_VMDESCRIPTION]):
            raise StreamError("migration stream truncated: no VM description at its end")
        if int.from_bytes(tail[start - 4 : start], "big") != len(tail) - start:
            raise StreamError("migration stream truncated: the VM description is cut short")
        try:
            json.loads(tail[start:])
        except ValueError:
            raise StreamError("migration stream corrupt: its VM description is not JSON") from None
        self.w.write(tail)


def filter_stream(
    src: BinaryIO,
    dst: BinaryIO,
    base: PageSource,
    block: bytes = TEMPLATE_BLOCK,
    *,
    whole: bool = False,
    pack: bool = False,
) -> FilterStats:
    """Copy QEMU 7.2's migration stream from `src` to `dst`, dropping PAGE records of `block`
    equal to `base` at the same offset. StreamError when the stream is truncated or corrupt
    (whatever was written to `dst` then is not a usable stream: the caller discards it).

    `whole`: the stream must name every page of `block` (what QEMU sends for a private RAM
    block saved while stopped). A stream that does not is not a clone's RAM (a RAM block that
    is a shared file is left out by `x-ignore-shared`): keeping it as a diff would lose the
    guest's memory, so it is a StreamError.

    `pack`: write the packed form (`_PackWriter`; what a clone's pause keeps): each kept page
    of `block` as a reference to a template page with the same content, as its XOR with the
    template's page, or as it is, all but incompressible pages deflated. `unpack_stream`
    gives back exactly the stream `pack=False` would have written."""
    f = _Filter(src, dst, base, block, pack=pack)
    stats = f.run()
    if whole:
        missing = f.covered.count(0)
        if missing:
            raise StreamError(
                f"the stream left out {missing} of {len(f.covered)} pages of {block.decode()}: "
                "this VM's RAM is not a private mapping of the template"
            )
    return stats


def unpack_stream(src: BinaryIO, dst: BinaryIO, base: PageSource) -> FilterStats:
    """The filtered stream a packed diff (`filter_stream(pack=True)`) was made from, on the
    same `base`. StreamError when it is truncated or corrupt."""
    return _Filter(src, dst, base, TEMPLATE_BLOCK, unpack=True).run()


def is_packed(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(PACK_MAGIC)) == PACK_MAGIC


def split_to_ram_file(src: BinaryIO, state: Path, ram_file: Path, template: TemplateRam) -> None:
    """Turn a clone's diff back into today's snapshot format: `ram_file` becomes a sparse copy
    of the template with the diff's pages of `mem0` written over it, and `state` the stream
    without any `mem0` record (what `x-ignore-shared` saves for a share=on RAM file). For a
    template made from a clone, or a clone leaving the shared template. `src` (seekable) may be
    packed. Both files are removed when the stream is bad."""
    fd = os.open(ram_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, template.size)
        for offset in range(0, template.size, 1 << 20):
            chunk = template[offset : offset + (1 << 20)]
            if chunk.count(0) != len(chunk):
                os.pwrite(fd, chunk, offset)

        # consecutive pages go out in one write (a diff holds runs of them: ~31000 pwrites
        # for a capsule holding 100 MB); a page that does not extend the run writes it first,
        # so the stream's order (a later copy of a page wins) is kept
        run: list[bytes] = []
        run_start = 0

        def flush() -> None:
            if run:
                os.pwrite(fd, b"".join(run), run_start)
                run.clear()

        def put(addr: int, page: bytes) -> None:
            nonlocal run_start
            if page.count(0) == PAGE_SIZE:
                flush()
                # a hole reads as zeros; never allocate a page for it
                if template[addr : addr + PAGE_SIZE].count(0) != PAGE_SIZE:
                    _punch(fd, addr, PAGE_SIZE)
                return
            if not run or addr != run_start + len(run) * PAGE_SIZE or len(run) >= 256:
                flush()
                run_start = addr
            run.append(page)

        with os.fdopen(os.open(state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            packed = src.read(len(PACK_MAGIC)) == PACK_MAGIC
            src.seek(0)
            _Filter(src, out, template, TEMPLATE_BLOCK, sink=put, unpack=packed).run()
        flush()
    except BaseException:
        state.unlink(missing_ok=True)
        ram_file.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _punch(fd: int, offset: int, length: int) -> None:
    if not sparse._punch(fd, offset, length):
        os.pwrite(fd, bytes(length), offset)


def filter_file(src: Path, dst: Path, base: PageSource) -> FilterStats:
    """`filter_stream` between files; `dst` is removed when the stream is bad."""
    try:
        with src.open("rb") as fin, dst.open("wb") as fout:
            return filter_stream(fin, fout, base)
    except BaseException:
        dst.unlink(missing_ok=True)
        raise


# -- with a running QEMU -----------------------------------------------------------------------


def _filter_fd(read_fd: int, dest: Path, base: PageSource, pack: bool) -> FilterStats:
    with os.fdopen(read_fd, "rb", buffering=0) as fin:
        try:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fout:
                return filter_stream(fin, fout, base, whole=True, pack=pack)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise


async def save_diff(
    vm: VM, dest: Path, template: TemplateRam, *, live: bool = False, pack: bool = True
) -> FilterStats:
    """Pause `vm` (a clone of `template`) into `dest`: stop it, then migrate it into a pipe
    whose other end the filter reads. The VM stays stopped. StreamError/MigrationFailed leave
    no `dest` behind. `live`: migrate while the guest runs (QEMU stops it at the end), which
    free-page hinting needs (the guest reports its free pages during the migration). `pack`:
    `dest` is the packed form (see filter_stream), which a restore unpacks as QEMU loads it.
    `dest` is not fsynced: the caller does (backend/capsules/snapshots.capture), once the VM
    runs again if it goes on running."""
    read_fd, write_fd = os.pipe()
    filtering: asyncio.Future[FilterStats] | None = None
    try:
        async with vm.session():
            if not live:
                await vm.stop()
            fd, read_fd = read_fd, -1
            filtering = asyncio.ensure_future(
                asyncio.to_thread(_filter_fd, fd, dest, template, pack)
            )
            try:
                await vm.save_to_fd(write_fd, "saving a RAM diff")
            finally:
                # QEMU holds its own copy: the filter sees EOF when QEMU is done with it
                os.close(write_fd)
                write_fd = -1
        return await filtering
    except Exception as exc:
        if write_fd >= 0:
            os.close(write_fd)
        cause: BaseException | None = None
        if filtering is not None:
            try:
                await asyncio.wait_for(filtering, 30)
            except Exception as filter_error:
                cause = filter_error
        dest.unlink(missing_ok=True)
        if isinstance(cause, (StreamError, OSError)) and cause is not exc:
            # the filter stopped reading first (a bad stream, a full disk) and QEMU then
            # failed on a broken pipe: the filter's error is the one that says what is wrong
            raise cause from exc
        raise
    finally:
        if read_fd >= 0:
            os.close(read_fd)
