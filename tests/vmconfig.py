"""A VMConfig with every path under one directory, for tests that look at what the runtime
would do with it (QEMU's command line, the metadata blob) without starting a VM."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from backend.runtime.base import VMConfig


def paper_config(directory: Path, **changes: Any) -> VMConfig:
    config = VMConfig(
        capsule_id="c1",
        run_dir=directory,
        kernel=directory / "vmlinux",
        initrd=directory / "initrd",
        disk=directory / "disk.qcow2",
        ram_file=directory / "mem",
        memory_mib=256,
        vcpus=1,
        host_port=1234,
        metadata_json="{}",
    )
    return replace(config, **changes)
