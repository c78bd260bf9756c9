"""Which accelerator can really run a guest here: KVM when a guest actually executes, else TCG.

A present `/dev/kvm` is not enough: on a nested "kvm-pvm" host only PVM-enabled guest kernels
run, and a normal guest spins forever with no output (a tiny firmware, by contrast, runs fine
there, so it proves nothing). So KVM is verified by booting the image's own kernel under it
with a short deadline, waiting for its banner on the serial port; without an image KVM is not
verified. TCG is checked with a 64 KiB firmware whose reset vector writes one byte to the
serial port and halts. The answer is cached per host boot, QEMU version and kernel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.config import settings

QEMU_BINARY = "qemu-system-x86_64"
PROBE_BYTE = b"K"
PROBE_TIMEOUT_S = 3.0
# Real-mode code at the reset vector (F000:FFF0): mov dx,0x3f8; mov al,'K'; out dx,al; hlt; jmp hlt
RESET_VECTOR_CODE = bytes([0xBA, 0xF8, 0x03, 0xB0, PROBE_BYTE[0], 0xEE, 0xF4, 0xEB, 0xFD])
FIRMWARE_SIZE = 64 * 1024


@dataclass(frozen=True)
class AccelProbe:
    accel: str
    """"kvm" or "tcg"; "none" when QEMU cannot run a guest at all."""
    kvm_present: bool
    kvm_usable: bool
    reason: str
    probe_ms: float


def qemu_binary() -> str | None:
    return shutil.which(QEMU_BINARY)


def qemu_version() -> str | None:
    binary = qemu_binary()
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    return first.replace("QEMU emulator version ", "").strip() or None


def _firmware(path: Path) -> None:
    image = bytearray(b"\xf4" * FIRMWARE_SIZE)  # hlt everywhere else
    start = FIRMWARE_SIZE - 16
    image[start : start + len(RESET_VECTOR_CODE)] = RESET_VECTOR_CODE
    path.write_bytes(bytes(image))


def _firmware_argv(binary: str, accel: str, firmware: Path) -> list[str]:
    return [
        binary,
        "-accel",
        accel,
        "-M",
        "microvm,x-option-roms=off,rtc=off",
        "-m",
        "16",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-bios",
        str(firmware),
        "-serial",
        "stdio",
    ]


def _kernel_argv(binary: str, kernel: Path) -> list[str]:
    # The CPU model the runtime uses under KVM; rdinit points nowhere, so the kernel panics
    # (and QEMU exits, -no-reboot) right after printing its banner.
    return [
        binary,
        "-accel",
        "kvm",
        "-M",
        "microvm",
        "-cpu",
        "host",
        "-m",
        "128",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-append",
        "console=ttyS0 earlyprintk=serial panic=-1 rdinit=/nonexistent",
        "-serial",
        "stdio",
    ]


def _probe_stream(argv: list[str], expect: bytes, timeout: float) -> tuple[bool, str]:
    """Run a probe guest; True as soon as `expect` appears on its serial port."""
    import selectors

    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    seen = b""
    try:
        while (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                continue
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                err = proc.stderr.read().decode(errors="replace").strip()
                return False, (err.splitlines() or ["QEMU exited"])[-1]
            seen += chunk
            if expect in seen:
                return True, "ok"
        return False, f"no output from a guest within {timeout:.0f} s"
    finally:
        selector.close()
        proc.kill()
        proc.wait()


def _cache_file() -> Path:
    from backend.config import default_paths

    return default_paths().state / "accel.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_accel(
    kernel: Path | None, use_cache: bool = True, timeout: float = PROBE_TIMEOUT_S
) -> AccelProbe:
    """Decide KVM or TCG by booting `kernel` (the image's vmlinux) under KVM.

    Without a kernel, KVM cannot be verified and TCG is chosen. The answer is cached per host
    boot, QEMU version and kernel.
    """
    forced = settings().accel
    if forced is not None:
        return AccelProbe(
            forced, Path("/dev/kvm").exists(), forced == "kvm", "forced by WRENN_ACCEL", 0.0
        )
    binary = qemu_binary()
    if binary is None:
        return AccelProbe("none", Path("/dev/kvm").exists(), False, "QEMU not found", 0.0)
    cache_key = f"{_boot_id()}:{qemu_version()}:{kernel}"
    cache = _cache_file()
    if use_cache:
        try:
            cached = json.loads(cache.read_text())
            if cached.get("key") == cache_key:
                return AccelProbe(**cached["probe"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
    started = time.monotonic()
    kvm_present = Path("/dev/kvm").exists()
    with tempfile.TemporaryDirectory(prefix="wrenn-probe-") as tmp:
        firmware = Path(tmp) / "probe.bin"
        _firmware(firmware)
        kvm_ok, kvm_reason = False, "/dev/kvm not present"
        if kvm_present:
            if not os.access("/dev/kvm", os.R_OK | os.W_OK):
                kvm_reason = "no read/write permission on /dev/kvm"
            elif kernel is None or not kernel.is_file():
                kvm_reason = "not verified: no guest kernel yet (build the image)"
            else:
                kvm_ok, kvm_reason = _probe_stream(
                    _kernel_argv(binary, kernel), b"Linux version", timeout
                )
                if not kvm_ok:
                    kvm_reason = f"a Linux guest did not boot under KVM ({kvm_reason})"
        if kvm_ok:
            result = AccelProbe(
                "kvm",
                True,
                True,
                "a Linux guest booted under KVM",
                (time.monotonic() - started) * 1000,
            )
        else:
            tcg_ok, tcg_reason = _probe_stream(
                _firmware_argv(binary, "tcg", firmware), PROBE_BYTE, timeout * 3
            )
            accel = "tcg" if tcg_ok else "none"
            reason = kvm_reason if tcg_ok else f"TCG failed: {tcg_reason}"
            result = AccelProbe(
                accel, kvm_present, False, reason, (time.monotonic() - started) * 1000
            )
    if result.accel != "none" and kernel is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"key": cache_key, "probe": asdict(result)}))
        except OSError:
            pass
    return result
