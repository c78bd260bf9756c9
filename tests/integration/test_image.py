"""The image builder against the real image that `make setup` built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from backend.config import Paths
from backend.image import ImageBuilder, ImageBuildError
from backend.image import tools as image_tools

WRENN = [sys.executable, "-m", "tui"]


def wrenn(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*WRENN, *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


def test_second_build_does_nothing_and_says_so(built_image: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in built_image.iterdir()}
    result = wrenn("image", "build")
    assert result.returncode == 0, result.stderr
    assert "up to date: nothing to do" in result.stdout
    after = {p.name: p.stat().st_mtime_ns for p in built_image.iterdir()}
    assert after == before


def test_image_list_json_reports_versions_and_hashes(built_image: Path) -> None:
    result = wrenn("image", "list", "--json")
    assert result.returncode == 0, result.stderr
    images = {i["name"]: i for i in json.loads(result.stdout)}
    default = images["default"]
    assert default["up_to_date"] is True
    manifest = default["manifest"]
    assert manifest["kernel_release"].endswith("-cloud-amd64")
    assert set(manifest["files"]) == {"vmlinux", "initrd.cpio.gz", "rootfs.ext4", "agent.ext4"}
    for f in manifest["files"].values():
        assert len(f["sha256"]) == 64
        assert (built_image / f["name"]).stat().st_size == f["size"]


def test_manifest_checksums_match_the_files(built_image: Path) -> None:
    from backend.image.manifest import load_manifest
    from backend.sparse import sparse_checksum

    manifest = load_manifest(built_image)
    assert manifest is not None
    assert (
        sparse_checksum(built_image / "initrd.cpio.gz") == manifest.files["initrd.cpio.gz"].sha256
    )


def test_changed_envd_source_makes_the_image_outdated(
    built_image: Path, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    builder = ImageBuilder(paths)
    assert builder.status().up_to_date
    real = builder.envd_source_hash()
    monkeypatch.setattr(builder, "envd_source_hash", lambda: real + "-changed")
    assert not builder.status().up_to_date


def test_full_disk_fails_clearly_and_leaves_no_image(tiny_fs: Path, short_tmp: Path) -> None:
    result = wrenn(
        "image",
        "build",
        env={
            "WRENN_DATA_DIR": str(tiny_fs / "data"),
            "WRENN_CACHE_DIR": str(tiny_fs / "cache"),
            "WRENN_STATE_DIR": str(short_tmp / "state"),
        },
    )
    assert result.returncode == 1
    assert "free" in result.stderr and "fix:" in result.stderr
    images = tiny_fs / "data" / "images"
    assert not any(images.glob("*/manifest.json")) if images.exists() else True


def test_not_root_fails_with_the_fix(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # In-process with the uid faked at its edge: a real unprivileged process could not read a
    # checkout (and its .venv) under a root-only directory, which is where CI clones.
    from click.testing import CliRunner

    from tui.cli import main

    monkeypatch.setattr(os, "geteuid", lambda: 65534)  # the builder's root check
    env = {
        "WRENN_DATA_DIR": str(short_tmp / "data"),
        "WRENN_CACHE_DIR": str(short_tmp / "c"),
        "WRENN_STATE_DIR": str(short_tmp / "s"),
    }
    result = CliRunner().invoke(main, ["image", "build"], env=env)
    assert result.exit_code == 1, result.output
    assert "needs root" in result.stderr


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(image_tools.REQUIRED_TOOLS, "wrenn-no-such-tool", "wrenn-pkg")
    with pytest.raises(ImageBuildError) as info:
        image_tools.require_tools()
    assert "wrenn-no-such-tool" in info.value.message
    assert "apt-get install wrenn-pkg" in info.value.hint
