"""`wrenn-tui doctor`: can capsules run on this machine, and if not, what to do about it."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from backend.config import Paths
from backend.image.builder import ImageBuilder
from backend.runtime.accel import probe_accel, qemu_binary, qemu_version

MIN_FREE_DISK = 2 << 30
MIN_FREE_SHM = 512 << 20


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True
    """A failing fatal check means capsules cannot run."""


def _writable(path: Path) -> tuple[bool, str]:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
        return True, str(path)
    except OSError as exc:
        return False, f"{path}: {exc.strerror or exc}"


def run_checks(paths: Paths) -> list[Check]:
    checks: list[Check] = []
    binary = qemu_binary()
    version = qemu_version()
    checks.append(
        Check(
            "qemu",
            binary is not None,
            f"{binary} ({version})" if binary else "not found",
            "run `make setup`, or apt-get install qemu-system-x86 qemu-utils",
        )
    )
    checks.append(
        Check(
            "qemu-img",
            shutil.which("qemu-img") is not None,
            shutil.which("qemu-img") or "not found",
            "apt-get install qemu-utils",
        )
    )

    builder = ImageBuilder(paths)
    status = builder.status()
    kernel = status.path / "vmlinux" if status.present else None
    if binary is not None:
        probe = probe_accel(kernel)
        if probe.accel == "kvm":
            checks.append(Check("accel", True, f"KVM usable: {probe.reason}"))
        elif probe.accel == "tcg":
            kvm = "KVM present but not usable" if probe.kvm_present else "no KVM"
            checks.append(
                Check(
                    "accel",
                    True,
                    f"{kvm}: {probe.reason}; using TCG (software emulation, slower)",
                    fix="" if probe.kvm_present else "enable virtualization for fast capsules",
                )
            )
        else:
            checks.append(Check("accel", False, probe.reason, "reinstall qemu-system-x86"))

    if status.manifest is None:
        checks.append(
            Check(
                "image",
                False,
                f"no image at {status.path}",
                "run `wrenn-tui image build` (as root)",
            )
        )
    else:
        m = status.manifest
        detail = f"{m.name} {m.version}, kernel {m.kernel_release}, envd {m.envd_version}" + (
            "" if status.up_to_date else " (outdated: inputs changed)"
        )
        checks.append(
            Check("image", True, detail, "" if status.up_to_date else "run `wrenn-tui image build`")
        )

    for label, path in (
        ("data dir", paths.data),
        ("state dir", paths.state),
        ("cache dir", paths.cache),
    ):
        ok, detail = _writable(path)
        checks.append(Check(label, ok, detail, f"make {path} writable or set WRENN_* dirs"))

    free = shutil.disk_usage(paths.state if paths.state.exists() else Path("/")).free
    checks.append(
        Check(
            "disk",
            free >= MIN_FREE_DISK,
            f"{free / 2**30:.1f} GiB free for state",
            "free disk space (snapshots need room)",
        )
    )
    if paths.shm.is_dir():
        shm_free = shutil.disk_usage(paths.shm).free
        checks.append(
            Check(
                "shm",
                shm_free >= MIN_FREE_SHM,
                f"{paths.shm}: {shm_free / 2**30:.1f} GiB free for guest RAM",
                "enlarge /dev/shm or set WRENN_SHM_DIR",
            )
        )
    else:
        checks.append(Check("shm", False, f"{paths.shm} missing", "set WRENN_SHM_DIR"))
    umoci = shutil.which("umoci")
    checks.append(
        Check(
            "oci",
            umoci is not None,
            f"umoci at {umoci}: `FROM oci:<path>` recipes can import images"
            if umoci
            else "no umoci: recipes cannot start `FROM oci:<path>`",
            "apt-get install umoci (or `make setup`)",
            fatal=False,
        )
    )
    checks.append(
        Check(
            "root",
            os.geteuid() == 0,
            "running as root" if os.geteuid() == 0 else "not root",
            "image builds need root (sudo)",
            fatal=False,
        )
    )
    return checks


def can_run_capsules(checks: list[Check]) -> bool:
    return all(c.ok for c in checks if c.fatal)
