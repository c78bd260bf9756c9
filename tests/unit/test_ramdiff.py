"""The RAM diff filter (backend/capsules/ramdiff.py) on synthetic QEMU 7.2 migration streams.

Each stream is built record by record the way QEMU 7.2 writes it; a small independent loader
(`load`) applies a stream to a copy of the template the way QEMU's ram_load does, so "the
filtered stream restores the same memory as the full one" is checked, not assumed.
"""

from __future__ import annotations

import fcntl
import io
import json
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from backend.capsules import ramdiff
from backend.capsules.ramdiff import (
    PAGE_SIZE,
    StreamError,
    TemplateRam,
    filter_file,
    filter_stream,
)

PAGES = 16
BASE = b"".join(bytes([i + 1]) * PAGE_SIZE for i in range(PAGES))
ROM = b"R" * PAGE_SIZE
DEVICE = b"\x04" + struct.pack(">I", 9) + b"\x05timer" + struct.pack(">II", 0, 1) + b"devstate"
VMDESC = json.dumps({"page_size": 4096, "devices": []}).encode()


def _name(block: bytes) -> bytes:
    return bytes([len(block)]) + block


def header(ignore_shared: bool = True) -> bytes:
    out = struct.pack(">II", ramdiff.QEMU_VM_FILE_MAGIC, 3)
    machine = b"microvm"
    out += b"\x07" + struct.pack(">I", len(machine)) + machine
    if ignore_shared:
        sub = b"configuration/capabilities"
        cap = b"x-ignore-shared"
        out += b"\x05" + _name(sub) + struct.pack(">I", 1) + struct.pack(">I", 1) + _name(cap)
    return out


def block_list(ignore_shared: bool = True) -> bytes:
    blocks = [(b"mem0", len(BASE)), (b"pc.bios", PAGE_SIZE)]
    out = struct.pack(">Q", sum(s for _, s in blocks) | ramdiff.RAM_SAVE_FLAG_MEM_SIZE)
    for name, size in blocks:
        out += _name(name) + struct.pack(">Q", size)
        if ignore_shared:
            out += struct.pack(">Q", 0)
    return out


def page(addr: int, data: bytes, block: bytes | None) -> bytes:
    flags = ramdiff.RAM_SAVE_FLAG_PAGE | (0 if block else ramdiff.RAM_SAVE_FLAG_CONTINUE)
    return struct.pack(">Q", addr | flags) + (_name(block) if block else b"") + data


def zero(addr: int, block: bytes | None) -> bytes:
    flags = ramdiff.RAM_SAVE_FLAG_ZERO | (0 if block else ramdiff.RAM_SAVE_FLAG_CONTINUE)
    return struct.pack(">Q", addr | flags) + (_name(block) if block else b"") + b"\x00"


EOS = struct.pack(">Q", ramdiff.RAM_SAVE_FLAG_EOS)


def footer(section: int) -> bytes:
    return b"\x7e" + struct.pack(">I", section)


def stream(records: list[bytes], ignore_shared: bool = True) -> bytes:
    """header, ram START (block list), one PART with `records`, END, a device, EOF, vmdesc."""
    start = b"\x01" + struct.pack(">I", 0) + _name(b"ram") + struct.pack(">II", 0, 4)
    return (
        header(ignore_shared)
        + start
        + block_list(ignore_shared)
        + EOS
        + footer(0)
        + b"\x02"
        + struct.pack(">I", 0)
        + b"".join(records)
        + EOS
        + footer(0)
        + b"\x03"
        + struct.pack(">I", 0)
        + EOS
        + footer(0)
        + DEVICE
        + footer(9)
        + b"\x00\x06"
        + struct.pack(">I", len(VMDESC))
        + VMDESC
    )


def load(data: bytes, ignore_shared: bool = True) -> tuple[bytes, bytes]:
    """Apply a stream's RAM records to a copy of BASE (mem0) and ROM: what QEMU's loader does
    (CONTINUE means the block of the previous record, whichever section it was in)."""
    mem = {b"mem0": bytearray(BASE), b"pc.bios": bytearray(ROM)}
    f = io.BytesIO(data)
    f.read(8)
    last: bytes | None = None
    while True:
        kind = f.read(1)[0]
        if kind == 7:
            f.read(struct.unpack(">I", f.read(4))[0])
            if ignore_shared:
                f.read(1 + 1 + 26 + 4 + 4 + 1 + 15)
            continue
        if kind in (0, 4):
            break
        f.read(4)
        if kind == 1:
            f.read(f.read(1)[0] + 8)
        while True:
            value = struct.unpack(">Q", f.read(8))[0]
            flags, addr = value & 0xFFF, value & ~0xFFF
            if flags & ramdiff.RAM_SAVE_FLAG_EOS:
                break
            if flags & ramdiff.RAM_SAVE_FLAG_MEM_SIZE:
                for _ in range(2):
                    f.read(f.read(1)[0] + 8 + (8 if ignore_shared else 0))
                continue
            if not flags & ramdiff.RAM_SAVE_FLAG_CONTINUE:
                last = f.read(f.read(1)[0])
            assert last is not None, "CONTINUE with no block before it"
            if flags & ramdiff.RAM_SAVE_FLAG_ZERO:
                mem[last][addr : addr + PAGE_SIZE] = f.read(1) * PAGE_SIZE
            else:
                mem[last][addr : addr + PAGE_SIZE] = f.read(PAGE_SIZE)
        assert f.read(1) == b"\x7e"
        f.read(4)
    return bytes(mem[b"mem0"]), bytes(mem[b"pc.bios"])


def run(data: bytes) -> tuple[bytes, ramdiff.FilterStats]:
    out = io.BytesIO()
    stats = filter_stream(io.BytesIO(data), out, BASE)
    return out.getvalue(), stats


def base_page(i: int) -> bytes:
    return BASE[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]


def test_pages_equal_to_the_template_are_dropped_and_the_rest_passes() -> None:
    changed = b"\xaa" * PAGE_SIZE
    records = [
        page(0, base_page(0), b"mem0"),  # same as template: dropped
        page(PAGE_SIZE, changed, None),  # CONTINUE after a dropped record: must name mem0
        page(2 * PAGE_SIZE, base_page(2), None),  # dropped
        zero(3 * PAGE_SIZE, None),  # ZERO: kept as is (its predecessor was kept)
        page(4 * PAGE_SIZE, changed, None),  # kept as is (its predecessor was kept)
        page(0, ROM, b"pc.bios"),  # another block: always kept
        page(5 * PAGE_SIZE, base_page(5), b"mem0"),  # dropped
    ]
    full = stream(records)
    out, stats = run(full)
    assert stats.pages == 5 and stats.pages_dropped == 3
    assert stats.zero_records == 1 and stats.other_pages == 1
    assert stats.input_bytes == len(full) and stats.output_bytes == len(out)
    # three records gone (two named their block); one CONTINUE now names it
    name = len(_name(b"mem0"))
    assert len(out) == len(full) - 3 * (8 + PAGE_SIZE) - 2 * name + name
    # the filtered stream restores exactly what the full one does
    assert load(out) == load(full)
    mem0, _ = load(out)
    assert mem0[PAGE_SIZE : 2 * PAGE_SIZE] == changed
    assert mem0[3 * PAGE_SIZE : 4 * PAGE_SIZE] == bytes(PAGE_SIZE)
    # and everything but RAM passes byte for byte
    assert out.startswith(header()) and out.endswith(DEVICE + footer(9) + full[-len(VMDESC) - 6 :])
    assert stats.blocks == {"mem0": len(BASE), "pc.bios": PAGE_SIZE}


def test_a_stream_with_nothing_to_drop_passes_unchanged() -> None:
    records = [page(i * PAGE_SIZE, b"\x77" * PAGE_SIZE, None if i else b"mem0") for i in range(4)]
    full = stream(records)
    out, stats = run(full)
    assert out == full and stats.pages_dropped == 0


def test_without_x_ignore_shared_the_block_list_has_no_addresses() -> None:
    full = stream([page(0, base_page(0), b"mem0"), page(PAGE_SIZE, ROM, None)], False)
    out, stats = run(full)
    assert stats.pages_dropped == 1
    assert load(out, False) == load(full, False)


def test_a_page_already_kept_is_never_dropped_later() -> None:
    """A live migration can send a page twice: changed, then back to the template's content.
    Dropping the second copy would leave the first (stale) one in force."""
    changed = b"\x55" * PAGE_SIZE
    full = stream([page(0, changed, b"mem0"), page(0, base_page(0), None)])
    out, stats = run(full)
    assert stats.pages_dropped == 0
    assert load(out)[0][:PAGE_SIZE] == base_page(0)


def test_continue_across_sections_refers_to_the_last_record_sent() -> None:
    """The first record of a section may CONTINUE the block of the previous section's last
    record; if that one was dropped, the filter must name the block."""
    changed = b"\x66" * PAGE_SIZE
    start = b"\x01" + struct.pack(">I", 0) + _name(b"ram") + struct.pack(">II", 0, 4)
    rom_then_same = page(0, ROM, b"pc.bios") + page(PAGE_SIZE, base_page(1), b"mem0")
    full = (
        header()
        + start
        + block_list()
        + EOS
        + footer(0)
        + b"\x02"
        + struct.pack(">I", 0)
        + rom_then_same
        + EOS
        + footer(0)
        + b"\x03"
        + struct.pack(">I", 0)
        + page(2 * PAGE_SIZE, changed, None)
        + EOS
        + footer(0)
        + DEVICE
        + footer(9)
        + b"\x00\x06"
        + struct.pack(">I", len(VMDESC))
        + VMDESC
    )
    out, stats = run(full)
    assert stats.pages_dropped == 1
    assert load(out) == load(full)
    assert load(out)[0][2 * PAGE_SIZE : 3 * PAGE_SIZE] == changed


@pytest.mark.parametrize("cut", [3, 20, 200, 4000, -len(VMDESC) - 3, -5, -1])
def test_a_truncated_stream_is_an_error_and_leaves_no_file(tmp_path: Path, cut: int) -> None:
    full = stream([page(0, b"\x11" * PAGE_SIZE, b"mem0"), page(PAGE_SIZE, base_page(1), None)])
    src, dst = tmp_path / "full", tmp_path / "diff"
    src.write_bytes(full[:cut])
    with pytest.raises(StreamError, match="truncated"):
        filter_file(src, dst, BASE)
    assert not dst.exists()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda s: b"XXXX" + s[4:], "bad magic"),
        (lambda s: s[:4] + struct.pack(">I", 2) + s[8:], "version 2"),
        (
            lambda s: s.replace(b"\x01\x00\x00\x00\x00\x03ram", b"\x01\x00\x00\x00\x00\x03rom"),
            "iterable",
        ),
        (lambda s: s.replace(b"\x00\x06", b"\x00\x09"), "VM description"),
        (lambda s: s[:-2] + b"!}", "not JSON"),
    ],
)
def test_a_corrupt_stream_is_a_clear_error(corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    full = stream([page(0, b"\x11" * PAGE_SIZE, b"mem0")])
    bad = corrupt(full)
    if bad == full:
        pytest.skip("corruption pattern not present")
    with pytest.raises(StreamError, match=message):
        run(bad)


def test_unsupported_records_are_refused() -> None:
    xbzrle = struct.pack(">Q", ramdiff.RAM_SAVE_FLAG_XBZRLE) + _name(b"mem0")
    with pytest.raises(StreamError, match="unsupported RAM record"):
        run(stream([xbzrle]))
    with pytest.raises(StreamError, match="never named"):
        run(stream([page(0, b"\x11" * PAGE_SIZE, None)]))
    with pytest.raises(StreamError, match="undeclared block"):
        run(stream([page(0, b"\x11" * PAGE_SIZE, b"nope")]))
    with pytest.raises(StreamError, match="outside block"):
        run(stream([page(PAGES * PAGE_SIZE, b"\x11" * PAGE_SIZE, b"mem0")]))


def test_a_template_of_another_size_is_refused() -> None:
    with pytest.raises(StreamError, match="the template"):
        filter_stream(io.BytesIO(stream([])), io.BytesIO(), BASE[:PAGE_SIZE])


def test_template_memfd_is_sealed_sparse_and_cannot_be_changed(tmp_path: Path) -> None:
    ram = tmp_path / "mem"
    with ram.open("wb") as f:
        f.truncate(64 * PAGE_SIZE)
        f.seek(8 * PAGE_SIZE)
        f.write(b"\x42" * PAGE_SIZE)
    template = TemplateRam.from_file(ram)
    try:
        assert template.seals() & ramdiff.SEALS == ramdiff.SEALS
        assert template.size == 64 * PAGE_SIZE
        assert template.allocated_bytes() <= 4 * PAGE_SIZE  # the holes stayed holes
        assert template[8 * PAGE_SIZE : 9 * PAGE_SIZE] == b"\x42" * PAGE_SIZE
        before = template.checksum()
        # reading it (holes too) allocates nothing: it is never read through a mapping
        assert template[0:PAGE_SIZE] == bytes(PAGE_SIZE)
        assert template.allocated_bytes() <= 4 * PAGE_SIZE
        # what QEMU 7.2 does to discard a page of a file-backed block: refused
        with pytest.raises(PermissionError):
            os.pwrite(template.fd, b"x", 0)
        punch = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        with pytest.raises(PermissionError):
            _fallocate(template.fd, punch, 8 * PAGE_SIZE, PAGE_SIZE)
        with pytest.raises(PermissionError):
            os.ftruncate(template.fd, 0)
        with pytest.raises(PermissionError):
            fcntl.fcntl(template.fd, fcntl.F_ADD_SEALS, 0)
        # a private writable mapping (what share=off gives QEMU) is allowed, and private
        fd = os.open(template.mem_path, os.O_RDWR)
        try:
            import mmap

            m = mmap.mmap(fd, template.size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            m[8 * PAGE_SIZE] = 0
            m.close()
        finally:
            os.close(fd)
        assert template.checksum() == before
    finally:
        template.close()


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_split_turns_a_diff_into_a_ram_file_and_a_stream_without_mem0(tmp_path: Path) -> None:
    base_file = tmp_path / "template"
    base_file.write_bytes(BASE)
    template = TemplateRam.from_file(base_file)
    try:
        changed = b"\xaa" * PAGE_SIZE
        full = stream(
            [
                page(0, changed, b"mem0"),
                zero(PAGE_SIZE, None),
                page(0, b"\x07" * PAGE_SIZE, b"pc.bios"),
                page(5 * PAGE_SIZE, base_page(5), b"mem0"),
            ]
        )
        state, ram = tmp_path / "state", tmp_path / "mem"
        ramdiff.split_to_ram_file(io.BytesIO(full), state, ram, template)
        mem0, rom = load(full)
        assert ram.read_bytes() == mem0
        # the page zeroed by the diff is a hole, not a page of zeros
        assert ram.stat().st_blocks * 512 <= len(BASE) - PAGE_SIZE
        # the state has no record of mem0 left, and still restores the ROM
        left_mem0, left_rom = load(state.read_bytes())
        assert left_mem0 == BASE and left_rom == rom == b"\x07" * PAGE_SIZE
        with pytest.raises(StreamError):
            ramdiff.split_to_ram_file(io.BytesIO(full[:-3]), state, ram, template)
        assert not state.exists() and not ram.exists()
    finally:
        template.close()


def test_build_argv_maps_a_private_base_share_off_and_leaves_the_default_alone(
    tmp_path: Path,
) -> None:
    from dataclasses import replace

    from backend.runtime.qemu import build_argv
    from tests.vmconfig import paper_config

    config = paper_config(tmp_path)
    default = build_argv(config)
    assert f"memory-backend-file,id=mem0,size=256M,mem-path={tmp_path}/mem,share=on" in default
    balloon = "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=on"
    assert balloon in default and not any("iothread" in a for a in default)
    private = build_argv(replace(config, ram_private_base="/proc/1/fd/7"))
    assert "memory-backend-file,id=mem0,size=256M,mem-path=/proc/1/fd/7,share=off" in private
    assert not any(str(tmp_path / "mem") in a for a in private)
    hint = build_argv(replace(config, free_page_hint=True))
    assert f"{balloon},free-page-hint=on,iothread=balloon-io" in hint


def test_a_stream_that_leaves_out_pages_of_the_block_is_not_taken_for_a_clones_ram() -> None:
    """A VM whose RAM is a shared file (not a clone) saves no page of it with
    x-ignore-shared: taken as a diff, that would be a pause that loses the guest's memory."""
    everything = [
        page(i * PAGE_SIZE, BASE[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], b"mem0")
        for i in range(PAGES)
    ]
    out = io.BytesIO()
    stats = filter_stream(io.BytesIO(stream(everything)), out, BASE, whole=True)
    assert stats.pages_dropped == PAGES
    for records in ([], everything[:-1], [zero(0, b"mem0")]):
        with pytest.raises(StreamError, match="left out"):
            filter_stream(io.BytesIO(stream(records)), io.BytesIO(), BASE, whole=True)
    # without `whole` (a stream filtered again, a test stream) a partial block is fine
    filter_stream(io.BytesIO(stream(everything[:3])), io.BytesIO(), BASE)


def test_a_zero_page_where_the_template_is_zero_too_is_dropped() -> None:
    """The guest zeroes what it frees: such pages need no record when the template's page
    reads as zeros (a hole); where the template has data, the zero page must be kept."""
    base = bytearray(BASE)
    base[3 * PAGE_SIZE : 4 * PAGE_SIZE] = bytes(PAGE_SIZE)
    records = [zero(3 * PAGE_SIZE, b"mem0"), zero(5 * PAGE_SIZE, None)]
    out = io.BytesIO()
    stats = filter_stream(io.BytesIO(stream(records)), out, bytes(base))
    assert stats.zero_dropped == 1
    mem, _ = load(out.getvalue())
    expected = bytearray(BASE)
    expected[5 * PAGE_SIZE : 6 * PAGE_SIZE] = bytes(PAGE_SIZE)
    # page 3 was dropped (the loader's base has data there: it is left as it was);
    # page 5 is zeroed over the template's data
    assert mem == bytes(expected)


def test_trim_gives_back_what_reads_of_holes_allocated_and_keeps_the_template(
    tmp_path: Path,
) -> None:
    """A read of a hole through a private mapping (QEMU saving a clone) allocates a page in
    the memfd; trim gives those back and never the template's own pages."""
    pages = 512
    ram_file = tmp_path / "mem"
    with ram_file.open("wb") as f:
        f.truncate(pages * PAGE_SIZE)
        for i in range(0, pages, 8):
            f.seek(i * PAGE_SIZE)
            f.write(bytes([i % 251 + 1]) * PAGE_SIZE)
    ram = TemplateRam.from_file(ram_file)
    try:
        sealed = ram.allocated_bytes()
        content = ram.checksum()
        assert sealed == (pages // 8) * PAGE_SIZE
        clone = mmap.mmap(ram.fd, ram.size, mmap.MAP_PRIVATE)
        try:
            assert sum(clone[i * PAGE_SIZE] for i in range(pages)) > 0
            clone[PAGE_SIZE : PAGE_SIZE + 5] = b"clone"  # a private copy, not the memfd's
            grown = ram.allocated_bytes()
            assert grown == pages * PAGE_SIZE
            # still mapped by the "clone": its page of a hole is left alone only if mapped;
            # the others go
            ram.trim()
        finally:
            clone.close()
        ram.trim()
        assert ram.allocated_bytes() == sealed
        assert ram.checksum() == content
    finally:
        ram.close()


# -- the packed diff ---------------------------------------------------------------------------


def packed_records() -> tuple[list[bytes], dict[str, bytes]]:
    """One record of each packed form, and CONTINUE records between them."""
    near = bytearray(base_page(1))
    near[100:108] = b"changed!"  # a few words changed: kept as its XOR with the template
    moved = base_page(7)  # the template's page 7, now at page 2: a reference
    noise = os.urandom(PAGE_SIZE)  # incompressible: stored as it is
    table = struct.pack("<1024I", *range(1024))  # a table of small numbers: deflated
    pages = {"near": bytes(near), "moved": moved, "noise": noise, "table": table}
    records = [
        page(PAGE_SIZE, pages["near"], b"mem0"),
        page(2 * PAGE_SIZE, moved, None),
        page(0, ROM, b"pc.bios"),
        page(3 * PAGE_SIZE, noise, b"mem0"),
        page(4 * PAGE_SIZE, table, None),
        zero(5 * PAGE_SIZE, None),
        page(6 * PAGE_SIZE, base_page(6), None),  # the template's own: dropped
        page(8 * PAGE_SIZE, noise, None),
    ]
    return records, pages


def pack(data: bytes) -> tuple[bytes, ramdiff.FilterStats]:
    out = io.BytesIO()
    stats = filter_stream(io.BytesIO(data), out, BASE, pack=True)
    return out.getvalue(), stats


def unpack(data: bytes) -> bytes:
    out = io.BytesIO()
    ramdiff.unpack_stream(io.BytesIO(data), out, BASE)
    return out.getvalue()


def test_a_packed_diff_unpacks_to_exactly_the_filtered_stream() -> None:
    records, pages = packed_records()
    full = stream(records)
    filtered, _ = run(full)
    packed, stats = pack(full)
    assert packed.startswith(ramdiff.PACK_MAGIC)
    assert stats.pages_dropped == 1
    assert (stats.pages_copied, stats.pages_xor, stats.pages_stored) == (1, 1, 2)
    assert stats.output_bytes == len(packed)
    assert unpack(packed) == filtered
    assert load(unpack(packed)) == load(full)
    # the noise is stored once per page (it cannot shrink); everything else is a few bytes
    assert 2 * PAGE_SIZE < len(packed) < 2 * PAGE_SIZE + len(filtered) // 8
    assert packed.count(pages["noise"]) == 2


def test_only_packed_files_hold_packed_records() -> None:
    """A migration stream naming the packed forms is refused: only unpacking reads them."""
    xor = struct.pack(">Q", ramdiff.RAM_SAVE_FLAG_PACK_XOR) + _name(b"mem0") + bytes(PAGE_SIZE)
    with pytest.raises(StreamError, match="unsupported RAM record"):
        run(stream([xor]))
    with pytest.raises(StreamError, match="bad magic"):
        unpack(stream([xor]))


@pytest.mark.parametrize("cut", [4, 8, 9, 12, 40, 200, 4000, -200, -13, -9, -5, -1])
def test_a_truncated_packed_diff_is_an_error(cut: int) -> None:
    records, _ = packed_records()
    packed, _ = pack(stream(records))
    with pytest.raises(StreamError, match=r"truncated|corrupt"):
        unpack(packed[:cut])


def test_a_corrupt_packed_diff_is_a_clear_error() -> None:
    records, _ = packed_records()
    packed, _ = pack(stream(records))
    magic = len(ramdiff.PACK_MAGIC)
    for bad in (
        packed[:magic] + b"Q" + packed[magic + 1 :],  # no such frame
        packed[:magic] + b"Z\xff\xff\xff\xff" + packed[magic + 5 :],  # a frame too long
        packed + b"\x00",  # bytes after its end
        packed[:-8] + (1).to_bytes(8, "big"),  # the end names another length
        packed[: magic + 5] + b"\xff" * 8 + packed[magic + 13 :],  # deflate garbage
    ):
        with pytest.raises(StreamError, match=r"corrupt|truncated"):
            unpack(bad)


def test_a_packed_record_outside_the_template_is_refused() -> None:
    """Hand-made packed files: a reference past the template's end, and an XOR record of
    another block, are errors rather than reads of someone else's memory."""

    def packed_file(logical: bytes) -> bytes:
        w = ramdiff._PackWriter(io.BytesIO())
        w.write(logical)
        w.flush()
        dst = w._dst
        assert isinstance(dst, io.BytesIO)
        return dst.getvalue()

    copy = ramdiff.RAM_SAVE_FLAG_PACK_COPY
    xor = ramdiff.RAM_SAVE_FLAG_PACK_XOR
    outside = struct.pack(">Q", copy) + _name(b"mem0") + struct.pack(">Q", PAGES * PAGE_SIZE)
    crooked = struct.pack(">Q", copy) + _name(b"mem0") + struct.pack(">Q", 17)
    rom = struct.pack(">Q", xor) + _name(b"pc.bios") + bytes(PAGE_SIZE)
    for record, message in ((outside, "outside"), (crooked, "outside"), (rom, "pc.bios")):
        with pytest.raises(StreamError, match=message):
            unpack(packed_file(stream([record])))


def test_a_large_diff_unpacks_within_bounded_reads() -> None:
    """Zero-filled XORs deflate about a thousandfold: unpacking inflates in bounded steps."""
    near = bytearray(base_page(3))
    near[0] ^= 1
    records = [page(3 * PAGE_SIZE, bytes(near), b"mem0")] * 400
    full = stream(records)
    packed, stats = pack(full)
    assert stats.pages_xor == 400 and len(packed) < 4 * PAGE_SIZE
    assert unpack(packed) == run(full)[0]


@pytest.fixture
def template(tmp_path: Path) -> Iterator[TemplateRam]:
    """BASE as a sealed template memfd."""
    base_file = tmp_path / "template"
    base_file.write_bytes(BASE)
    ram = TemplateRam.from_file(base_file)
    yield ram
    ram.close()


def test_split_reads_a_packed_diff_as_the_stream_it_was_packed_from(
    tmp_path: Path, template: TemplateRam
) -> None:
    records, _ = packed_records()
    full = stream(records)
    packed, _ = pack(full)
    out: dict[str, tuple[bytes, bytes]] = {}
    for kind, data in (("filtered", run(full)[0]), ("packed", packed)):
        state, ram = tmp_path / f"{kind}.state", tmp_path / f"{kind}.mem"
        ramdiff.split_to_ram_file(io.BytesIO(data), state, ram, template)
        out[kind] = (state.read_bytes(), ram.read_bytes())
    assert out["packed"] == out["filtered"]
    assert out["packed"][1] == load(full)[0]


def test_a_template_builds_its_page_index_in_the_background_and_packing_does_not_wait(
    template: TemplateRam,
) -> None:
    """The first pause that needs the index of moved pages does not wait 0.2-0.3 s for it:
    its moved pages are deflated instead (and unpack the same), later pauses find them."""
    records, _ = packed_records()
    full = stream(records)
    filtered, _ = run(full)
    assert template._indexing is None  # asking for it would start it
    first = io.BytesIO()
    stats = filter_stream(io.BytesIO(full), first, template, pack=True)
    assert template._indexing is not None
    template._indexing.join(10)
    assert template.page_index_if_ready() == ramdiff.page_index(BASE)
    second = io.BytesIO()
    again = filter_stream(io.BytesIO(full), second, template, pack=True)
    assert (stats.pages_copied, again.pages_copied) == (0, 1)
    for packed in (first.getvalue(), second.getvalue()):
        out = io.BytesIO()
        ramdiff.unpack_stream(io.BytesIO(packed), out, template)
        assert out.getvalue() == filtered
