"""The API key on disk and the two commands: ``api-key`` and ``serve``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from backend.api.cli import api_key
from backend.api.keys import key_path, load_or_create_key, rotate_key
from backend.config import Paths

REPO = Path(__file__).resolve().parents[2]


def scratch(tmp_path: Path) -> Paths:
    return Paths(
        data=tmp_path / "data",
        state=tmp_path / "state",
        cache=tmp_path / "cache",
        config=tmp_path / "config",
        shm=tmp_path / "shm",
    )


def test_the_key_is_made_once_private_and_rotatable(tmp_path: Path) -> None:
    paths = scratch(tmp_path)
    key = load_or_create_key(paths)
    assert key.startswith("wrenn_") and len(key) > 30
    assert key_path(paths).stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(paths) == key
    key_path(paths).chmod(0o644)
    assert load_or_create_key(paths) == key
    assert key_path(paths).stat().st_mode & 0o777 == 0o600
    rotated = rotate_key(paths)
    assert rotated != key and load_or_create_key(paths) == rotated
    key_path(paths).write_text("\n")
    assert load_or_create_key(paths).startswith("wrenn_")


def test_api_key_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WRENN_CONFIG_DIR", str(tmp_path / "config"))
    runner = CliRunner()
    first = runner.invoke(api_key, [])
    assert first.exit_code == 0, first.output
    assert runner.invoke(api_key, []).output == first.output
    rotated = runner.invoke(api_key, ["--rotate"])
    assert rotated.output != first.output
    assert (tmp_path / "config" / "api-key").read_text() == rotated.output


def test_serve_prints_the_environment_and_answers(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "WRENN_CONFIG_DIR": str(tmp_path / "config"),
        "WRENN_STATE_DIR": str(tmp_path / "state"),
        "WRENN_DATA_DIR": str(tmp_path / "data"),
        "WRENN_CACHE_DIR": str(tmp_path / "cache"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", "from backend.api.cli import serve; serve(['--port', '0'])"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        exported = dict(
            line.removeprefix("export ").strip().split("=", 1)
            for line in lines
            if line.startswith("export ")
        )
        assert set(exported) == {"E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL"}, lines
        assert exported["E2B_API_URL"] == exported["E2B_SANDBOX_URL"]
        assert exported["E2B_API_URL"].startswith("http://127.0.0.1:")
        # The key is never printed (issue 16): the line says how to get it.
        key = (tmp_path / "config" / "api-key").read_text().strip()
        assert exported["E2B_API_KEY"] == "$(wrenn-tui api-key)"
        assert not any(key in line for line in lines)
        listed = httpx.get(
            f"{exported['E2B_API_URL']}/v2/sandboxes",
            headers={"X-API-KEY": key},
        )
        assert listed.status_code == 200 and listed.json() == []
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
