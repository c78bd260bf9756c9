"""snapshots.capture and the balloon: a template is saved with the balloon deflated again (its
clones start with all their memory; issue 21), a pause with it inflated (its resume deflates),
and a deflate that fails leaves a template capture going on with the balloon counted inflated."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend import sparse
from backend.capsules import snapshots
from backend.capsules.snapshots import CaptureSpec
from backend.runtime.base import VMConfig, VMMGone
from tests.unit.fakes import FakeEnvds, FakeRuntime, FakeVM

MIB = 1 << 20


def _config(tmp_path: Path) -> VMConfig:
    return VMConfig(
        capsule_id="c1",
        run_dir=tmp_path / "run",
        kernel=tmp_path / "vmlinux",
        initrd=tmp_path / "initrd",
        disk=tmp_path / "disk.qcow2",
        ram_file=tmp_path / "mem",
        memory_mib=256,
        vcpus=1,
        host_port=1234,
        metadata_json="{}",
    )


async def _capture(
    tmp_path: Path, runtime: FakeRuntime, *, keep_running: bool, release: bool
) -> tuple[FakeVM, list[int], snapshots.Capture]:
    config = _config(tmp_path)
    sparse.create_holes(config.ram_file, 256 * MIB)
    config.disk.write_bytes(b"disk")
    vm = await runtime.create(config)
    assert isinstance(vm, FakeVM)
    at_stop: list[int] = []
    real_stop = vm.stop

    async def stop() -> None:
        at_stop.append(vm.balloon)
        await real_stop()

    vm.stop = stop  # type: ignore[method-assign]
    envd = FakeEnvds()("http://guest", None, 1.0)
    spec = CaptureSpec(256, 1, "none", "tcg", envd_token="t")
    captured = await snapshots.capture(
        vm,
        envd,
        tmp_path / "out",
        spec,
        ram_file=config.ram_file,
        disk=config.disk,
        keep_running=keep_running,
        release_balloon=release,
    )
    return vm, at_stop, captured


@pytest.fixture(autouse=True)
def _no_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshots, "RELEASE_SETTLE_S", 0.0)


async def test_a_template_is_saved_with_the_balloon_deflated_again(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    vm, at_stop, captured = await _capture(tmp_path, runtime, keep_running=False, release=True)
    # inflated (the fake guest has 200 MiB available: all but the margin taken), then given back
    # before the VM stopped
    assert runtime.faults.calls.count("balloon_set") == 2
    assert at_stop == [256 * MIB]
    # nothing left for the caller to deflate after the commit
    assert captured.manifest.directory.is_dir()
    assert vm.balloon == 256 * MIB


async def test_a_pause_is_saved_with_the_balloon_inflated(tmp_path: Path) -> None:
    runtime = FakeRuntime()
    vm, at_stop, _ = await _capture(tmp_path, runtime, keep_running=False, release=False)
    expected = 256 * MIB - (200 * MIB - snapshots.BALLOON_MARGIN)
    assert at_stop == [expected] and vm.balloon == expected
    assert runtime.faults.calls.count("balloon_set") == 1


async def test_a_failed_deflate_keeps_the_template_capture_and_deflates_after_it(
    tmp_path: Path,
) -> None:
    runtime = FakeRuntime()
    calls = {"n": 0}
    real_hit = runtime.faults.hit

    def hit(what: str) -> None:
        # the second balloon_set is the release: QEMU refuses it
        if what == "balloon_set":
            calls["n"] += 1
            if calls["n"] == 2:
                runtime.faults.arm("balloon_set", VMMGone("QMP balloon failed"))
        real_hit(what)

    runtime.faults.hit = hit  # type: ignore[method-assign]
    vm, at_stop, captured = await _capture(tmp_path, runtime, keep_running=True, release=True)
    inflated = 256 * MIB - (200 * MIB - snapshots.BALLOON_MARGIN)
    # saved with the balloon still inflated, then the running VM got its memory back
    assert at_stop == [inflated]
    assert vm.balloon == 256 * MIB and vm.running
    assert captured.manifest.directory.is_dir()
