"""`wrenn-tui capsule metrics`: stored history plus a few live samples."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backend.capsules.models import State
from backend.capsules.store import Store
from backend.config import Paths
from backend.sampler import SERIES
from backend.sampler.cli import metrics_command, sparkline
from backend.sampler.history_codec import encode
from backend.sampler.rings import TieredHistory
from tests.sampler.conftest import HostEnvd
from tests.sampler.helpers import put_capsule


def scratch_paths(tmp_path: Path) -> Paths:
    base = tmp_path / "agent"
    return Paths(
        data=base / "data", state=base / "state", cache=base / "cache", config=base / "config",
        shm=base / "shm",
    )  # fmt: skip


def stored_history(seconds_ago: float, count: int) -> str:
    history = TieredHistory(len(SERIES))
    start = time.time() - seconds_ago
    for i in range(count):
        history.add(start + i, [100 << 20, 10 << 20, 12.5, 3.0, 200 << 20])
    return encode(history, SERIES)


def test_a_running_capsule_shows_stored_and_live_points(
    tmp_path: Path,
    start_envds: Callable[[int], list[HostEnvd]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    (envd,) = start_envds(1)
    paths = scratch_paths(tmp_path)
    store = Store(paths.database)
    put_capsule(store, "cl-live", State.RUNNING, port=envd.port, pid=envd.proc.pid)
    store.put_metrics("cl-live", stored_history(120, 10))
    store.close()

    assert metrics_command("cl-live", "5m", True, paths=paths) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["state"] == "running"
    assert (document["range"], document["window_s"], document["step_s"]) == ("5m", 300, 1.0)
    used = document["series"]["guest_mem_used"]
    assert len(used["points"]) == 10 + 3
    assert used["points"][0][1] == 100 << 20
    assert used["max"] > 100 << 20  # this host uses more than the stored 100 MiB
    assert document["latest"]["healthy"] is True
    assert document["latest"]["guest_mem_total"] > 0
    assert document["latest"]["host_cpu_pct"] is not None
    assert len(document["series"]["host_cpu_pct"]["points"]) == 10 + 2  # first tick primes


def test_a_paused_capsule_is_not_polled(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = scratch_paths(tmp_path)
    store = Store(paths.database)
    put_capsule(store, "cl-p", State.PAUSED, port=1)
    store.put_metrics("cl-p", stored_history(30, 20))
    store.close()

    started = time.monotonic()
    assert metrics_command("cl-p", "1m", False, paths=paths) == 0
    assert time.monotonic() - started < 1
    out = capsys.readouterr().out
    assert out.startswith("cl-p paused · last 1m · 20 points of 1 s")
    assert re.search(r"^guest mem used +100\.0 MiB +100\.0 MiB", out, re.M)
    assert re.search(r"^guest cpu +12\.5 %", out, re.M)

    assert metrics_command("cl-p", "24h", True, paths=paths) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["latest"] is None
    assert document["step_s"] == 300.0
    # One 5 min average, or two when the stored 20 s straddle a bucket boundary.
    assert [v for _, v in document["series"]["guest_cpu_pct"]["points"]] in ([12.5], [12.5] * 2)


def test_no_history_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = scratch_paths(tmp_path)
    store = Store(paths.database)
    put_capsule(store, "cl-new", State.STOPPED)
    store.close()
    assert metrics_command("cl-new", "10m", False, paths=paths) == 0
    assert "no samples in this range (the capsule is stopped)" in capsys.readouterr().out


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = scratch_paths(tmp_path)
    assert metrics_command("cl-none", "5m", False, paths=paths) == 1
    assert "no capsule 'cl-none'" in capsys.readouterr().err
    assert metrics_command("cl-none", "3m", False, paths=paths) == 2
    assert "unknown range '3m'; one of 1m, 5m, 10m, 1h, 2h, 24h" in capsys.readouterr().err


def test_sparkline() -> None:
    assert sparkline([]) == ""
    assert sparkline([5.0, 5.0]) == "▁▁"
    assert sparkline([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]) == "▁▂▃▄▅▆▇█"
    assert len(sparkline([float(i) for i in range(1000)], width=40)) == 40
