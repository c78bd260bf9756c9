import errno
import os
from pathlib import Path

import pytest

from backend.sparse import allocated_bytes, sparse_checksum, sparse_copy


def _sparse_file(path: Path) -> None:
    with path.open("wb") as f:
        f.truncate(64 << 20)
        f.seek(1 << 20)
        f.write(os.urandom(256 << 10))
        f.seek(40 << 20)
        f.write(b"tail" * 1024)


def test_copy_keeps_holes_and_content(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    _sparse_file(src)
    result = sparse_copy(src, dst)
    assert dst.read_bytes() == src.read_bytes()
    assert result.size == 64 << 20
    assert allocated_bytes(dst) < 2 << 20, "holes were filled in"
    assert result.sha256 == sparse_checksum(dst) == sparse_checksum(src)


def test_checksum_detects_a_changed_byte(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _sparse_file(src)
    before = sparse_checksum(src)
    with src.open("r+b") as f:
        f.seek((1 << 20) + 5)
        byte = f.read(1)
        f.seek((1 << 20) + 5)
        f.write(bytes([byte[0] ^ 1]))
    assert sparse_checksum(src) != before


def test_copy_onto_a_full_filesystem_raises_enospc(tiny_fs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    _sparse_file(src)  # 256 KiB + 4 KiB of data; tiny_fs holds 128 KiB
    with pytest.raises(OSError) as info:
        sparse_copy(src, tiny_fs / "dst")
    assert info.value.errno == errno.ENOSPC
