"""QEMU's command line: what the TCG path adds to cut an idle capsule's host memory, and that
none of it reaches KVM (issue 21)."""

from __future__ import annotations

from pathlib import Path

from backend.runtime.base import VMConfig
from backend.runtime.qemu import build_argv
from tests.vmconfig import paper_config


def _config(tmp_path: Path, accel: str) -> VMConfig:
    return paper_config(tmp_path, accel=accel, extra_append=("init=/sbin/x",))


def _append(argv: list[str]) -> list[str]:
    return argv[argv.index("-append") + 1].split()


def test_tcg_guests_boot_without_address_space_randomisation(tmp_path: Path) -> None:
    append = _append(build_argv(_config(tmp_path, "tcg")))
    assert "norandmaps" in append
    # the caller's own options still come last
    assert append[-1] == "init=/sbin/x"


def test_kvm_guests_keep_address_space_randomisation(tmp_path: Path) -> None:
    argv = build_argv(_config(tmp_path, "kvm"))
    assert "norandmaps" not in _append(argv)
    assert argv[argv.index("-accel") + 1] == "kvm"
