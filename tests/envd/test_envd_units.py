"""Pure functions and small classes, without a server."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
from pathlib import Path

import pytest

from backend.envd.auth import token_matches
from backend.envd.buffers import OutputLog
from backend.envd.errors import ApiError
from backend.envd.metadata import MetadataError, parse_metadata, parse_source
from backend.envd.metrics import (
    CpuSampler,
    CpuTimes,
    ProcReader,
    cpu_percent,
    parse_meminfo,
    parse_proc_stat,
)
from backend.envd.paths import PathResolver
from backend.envd.pty_sessions import PtyStartRequest, check_size
from backend.envd.pty_ws import skip_partial_char
from backend.envd.reclaimer import should_reclaim
from backend.envd.spawn import exit_status
from backend.envd.state import InitRequest, RuntimeState
from backend.envd.users import Account, can_access
from backend.envd.validation import Fields, check_tag, parse_signal

MEMINFO = """\
MemTotal:        2000000 kB
MemFree:          500000 kB
MemAvailable:     800000 kB
Buffers:           10000 kB
Cached:           300000 kB
SwapCached:            0 kB
HugePages_Total:       0
"""

STAT_1 = """\
cpu  100 0 100 800 0 0 0 0 0 0
cpu0 50 0 50 400 0 0 0 0 0 0
cpu1 50 0 50 400 0 0 0 0 0 0
intr 12345
"""
STAT_2 = """\
cpu  150 0 150 900 0 0 0 0 50 0
cpu0 75 0 75 450 0 0 0 0 0 0
cpu1 75 0 75 450 0 0 0 0 0 0
intr 12399
"""


def test_meminfo_is_parsed_into_bytes() -> None:
    mem = parse_meminfo(MEMINFO)
    assert mem.total == 2_000_000 * 1024
    assert mem.available == 800_000 * 1024
    assert mem.cached == 300_000 * 1024
    assert mem.used == (2_000_000 - 800_000) * 1024
    assert mem.figures()["mem_used"] == mem.used
    assert mem.used_fraction == pytest.approx(0.6)


def test_meminfo_without_memavailable_estimates_it() -> None:
    old_kernel = "\n".join(line for line in MEMINFO.splitlines() if "MemAvailable" not in line)
    mem = parse_meminfo(old_kernel)
    assert mem.available == (500_000 + 300_000 + 10_000) * 1024


def test_garbage_meminfo_gives_zeros_not_an_exception() -> None:
    mem = parse_meminfo("nonsense\nMemTotal: lots kB\n")
    assert mem.total == 0
    assert mem.used_fraction == 0.0


def test_cpu_percent_comes_from_stat_deltas_excluding_guest_time() -> None:
    first, second = parse_proc_stat(STAT_1), parse_proc_stat(STAT_2)
    assert first.cpu_count == 2
    assert first.cpu == CpuTimes(busy=200, total=1000)
    # +100 busy, +100 idle; the guest column (50) is already inside user and is not added.
    assert cpu_percent(first.cpu, second.cpu) == 50.0
    assert cpu_percent(second.cpu, second.cpu) == 0.0


def test_cpu_sampler_reads_an_injected_proc(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text(STAT_1)
    sampler = CpuSampler(ProcReader(tmp_path))
    sampler.sample()
    assert sampler.samples == 0
    (tmp_path / "stat").write_text(STAT_2)
    sampler.sample()
    assert sampler.cpu_used_pct == 50.0
    assert sampler.cpu_count == 2
    assert sampler.samples == 1


async def test_cpu_sampler_ticks_on_a_fixed_clock(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text(STAT_1)
    sampler = CpuSampler(ProcReader(tmp_path), interval=0.05)
    task = asyncio.create_task(sampler.run())
    await asyncio.sleep(0.5)
    task.cancel()
    # About 10 ticks; a sleep-after-work loop would also pass, but a busy loop would not.
    assert 3 <= sampler.samples <= 11


@pytest.mark.parametrize(
    ("used_pct", "threshold", "snapshot", "cached_mib", "expected"),
    [
        (85, 80, False, 100, True),
        (80, 80, False, 100, True),
        (79, 80, False, 100, False),
        (95, 80, True, 100, False),
        (95, 80, False, 1, False),
        (2, 1, False, 100, True),
    ],
)
def test_reclaim_decision(
    used_pct: int, threshold: float, snapshot: bool, cached_mib: int, expected: bool
) -> None:
    total_kib = 1000 * 1024
    available_kib = total_kib * (100 - used_pct) // 100
    mem = parse_meminfo(
        f"MemTotal: {total_kib} kB\nMemAvailable: {available_kib} kB\n"
        f"Cached: {cached_mib * 1024} kB\n"
    )
    assert should_reclaim(mem, threshold, snapshot) is expected


def test_host_mode_paths_stay_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "home" / "u").mkdir(parents=True)
    (root / "etc").mkdir()
    resolver = PathResolver(root)
    real_root = root.resolve()
    assert resolver.to_real("/etc/x", "/home/u") == real_root / "etc" / "x"
    assert resolver.to_real("notes/a.txt", "/home/u") == real_root / "home/u/notes/a.txt"
    assert resolver.to_real("../u/./b", "/home/u") == real_root / "home/u/b"
    assert resolver.to_virtual(real_root / "home/u/b") == "/home/u/b"
    with pytest.raises(ApiError) as err:
        resolver.to_real("../../../etc/passwd", "/home/u")
    assert (err.value.status, err.value.code) == (403, "path_escape")
    (root / "out").symlink_to("/etc")
    with pytest.raises(ApiError) as err:
        resolver.to_real("/out/passwd", "/")
    assert err.value.status == 403
    (root / "in").symlink_to(root / "etc")
    assert resolver.to_real("/in/hosts", "/") == real_root / "etc" / "hosts"
    for bad in ("", "a\0b"):
        with pytest.raises(ApiError) as err:
            resolver.to_real(bad, "/")
        assert err.value.status == 400


def test_guest_mode_paths_are_plain_normalised_paths() -> None:
    resolver = PathResolver(None)
    assert resolver.to_real("/../etc//passwd", "/root") == Path("/etc/passwd")
    assert resolver.to_real("x/../y", "/root") == Path("/root/y")
    assert resolver.to_virtual(Path("/root/y")) == "/root/y"


def test_metadata_parsing_tolerates_missing_extra_and_mistyped_fields() -> None:
    full = parse_metadata(b'{"instanceID": "sb-1", "envID": "tpl-1", "extra": [1, 2]}')
    assert (full.instance_id, full.template_id) == ("sb-1", "tpl-1")
    prefers_template = parse_metadata(b'{"templateID": "t2", "envID": "e2"}')
    assert prefers_template.template_id == "t2"
    empty = parse_metadata(b"{}")
    assert (empty.instance_id, empty.template_id) == (None, None)
    mistyped = parse_metadata(b'{"instanceID": 5, "templateID": "t"}')
    assert (mistyped.instance_id, mistyped.template_id) == (None, "t")
    for bad in (b"not json", b"[1, 2]", b"\xff\xfe", b""):
        with pytest.raises(MetadataError):
            parse_metadata(bad)


def test_metadata_source_specs() -> None:
    assert callable(parse_source("tcp:10.0.2.100:80"))
    assert callable(parse_source("tcp:[::1]:8080"))
    assert callable(parse_source("file:/tmp/meta.json"))
    for bad in ("tcp:host", "tcp:host:0", "tcp:host:http", "http://x", "file:", "x"):
        with pytest.raises(ValueError):
            parse_source(bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("SIGTERM", signal.SIGTERM),
        ("term", signal.SIGTERM),
        (9, signal.SIGKILL),
        ("2", signal.SIGINT),
    ],
)
def test_signal_parsing(value: object, expected: signal.Signals) -> None:
    assert parse_signal(value) == expected


@pytest.mark.parametrize("value", ["SIGNOPE", 0, 999, True, None, [15], 1.5])
def test_bad_signals_are_400(value: object) -> None:
    with pytest.raises(ApiError) as err:
        parse_signal(value)
    assert (err.value.status, err.value.code) == (400, "invalid_signal")


def test_fields_reject_wrong_types() -> None:
    f = Fields({"n": True, "s": 3, "m": {"a": 1}, "l": ["a", 2], "x": float("nan")})
    for getter, key in (
        (f.opt_int, "n"),
        (f.opt_str, "s"),
        (f.opt_str_map, "m"),
        (f.opt_str_list, "l"),
        (f.opt_number, "x"),
        (f.opt_number, "n"),
    ):
        with pytest.raises(ApiError) as err:
            getter(key)
        assert err.value.code == "invalid_field"
    assert Fields({}).opt_int("missing") is None
    with pytest.raises(ApiError) as err:
        Fields([1])
    assert err.value.code == "invalid_body"


def test_tags() -> None:
    assert check_tag("shell-1.main") == "shell-1.main"
    for bad in ("", "123", "a/b", "x" * 129, "sp ace"):
        with pytest.raises(ApiError):
            check_tag(bad)


def test_init_request_parsing() -> None:
    req = InitRequest.parse(
        {
            "accessToken": "t",
            "envVars": {"A": "1"},
            "timestamp": 1700000000,
            "entropy": "AAEC",
            "envID": "tpl",
            "reclaimThreshold": 50,
            "unknown": 1,
        }
    )
    assert req.entropy == b"\x00\x01\x02"
    assert req.timestamp == 1700000000.0
    assert req.template_id == "tpl"
    assert req.reclaim_threshold == 50
    for bad in (
        {"timestamp": "now"},
        {"envVars": ["A=1"]},
        {"entropy": "%%%"},
        {"reclaimThreshold": 0},
        {"reclaimThreshold": 101},
        {"envVars": {"A=B": "1"}},
        {"accessToken": 5},
    ):
        with pytest.raises(ApiError) as err:
            InitRequest.parse(bad)
        assert err.value.status == 400, bad


def test_sandbox_env_exports_wrenn_and_e2b_names() -> None:
    state = RuntimeState(sandbox_id="sb", template_id="tp", env_vars={"X": "1"})
    assert state.sandbox_env() == {
        "WRENN_SANDBOX_ID": "sb",
        "E2B_SANDBOX_ID": "sb",
        "WRENN_TEMPLATE_ID": "tp",
        "E2B_TEMPLATE_ID": "tp",
        "X": "1",
    }


def test_snapshot_hold_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    state = RuntimeState(snapshot_hold_timeout=10)
    now = [1000.0]
    monkeypatch.setattr("backend.envd.state.time.monotonic", lambda: now[0])
    state.begin_snapshot()
    now[0] += 9
    assert state.snapshot_in_progress
    now[0] += 2
    assert not state.snapshot_in_progress


def test_pty_sizes() -> None:
    assert check_size(None, None) == (80, 24)
    assert check_size(1000, 1) == (1000, 1)
    for cols, rows in ((0, 24), (100000, 24), (80, 0), (80, 1001), (-1, -1)):
        with pytest.raises(ApiError) as err:
            check_size(cols, rows)
        assert err.value.code == "invalid_size"
    with pytest.raises(ApiError):
        PtyStartRequest.parse({"type": "start", "args": ["-c", "x"]})
    with pytest.raises(ApiError):
        PtyStartRequest.parse({"type": "start", "cols": "80"})


def test_replay_starting_mid_character_is_trimmed() -> None:
    euro = "€".encode()
    assert skip_partial_char(euro[1:] + b"ok") == b"ok"
    assert skip_partial_char(euro + b"ok") == euro + b"ok"
    assert skip_partial_char(b"\x80" * 5) == b"\x80\x80"


def test_exit_status_is_shell_style() -> None:
    assert exit_status(0) == (0, None)
    assert exit_status(3) == (3, None)
    assert exit_status(-9) == (137, "SIGKILL")


def test_token_comparison() -> None:
    assert token_matches(None, None)
    assert token_matches("abc", "abc")
    assert not token_matches("abc", "abd")
    assert not token_matches("abc", None)
    assert not token_matches("abc", "")


def _stat(mode: int, uid: int, gid: int) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, gid, 0, 0, 0, 0))


def test_permission_check_for_ordinary_users() -> None:
    alice = Account("alice", 1000, 1000, "/home/alice", "/bin/sh", (1000, 27))
    root = Account("root", 0, 0, "/root", "/bin/sh", (0,))
    assert can_access(_stat(0o600, 1000, 1000), alice, os.R_OK | os.W_OK)
    assert not can_access(_stat(0o600, 0, 0), alice, os.R_OK)
    assert can_access(_stat(0o640, 0, 27), alice, os.R_OK)
    assert not can_access(_stat(0o640, 0, 27), alice, os.W_OK)
    assert can_access(_stat(0o604, 0, 0), alice, os.R_OK)
    assert can_access(_stat(0o000, 1000, 1000), root, os.R_OK | os.W_OK)
    assert not can_access(_stat(0o644, 0, 0), root, os.X_OK)


async def test_output_log_trims_oldest_and_reports_what_a_late_reader_missed() -> None:
    log: OutputLog[bytes] = OutputLog(capacity=1000, high_water=10_000)
    early = log.attach(replay=True)
    for i in range(20):
        log.append(bytes([65 + i]) * 36, 36)  # 100 bytes each with the per-chunk overhead
    assert log.retained_bytes == 1000
    reader = log.attach(replay=True)
    batch = reader.read_nowait(10_000)
    assert batch is not None
    assert b"".join(batch.items).startswith(b"K" * 36)  # chunks A..J are gone
    assert batch.resync and batch.missed == 0  # a replay that starts mid-stream
    assert reader.read_nowait(10_000) is None
    behind = early.read_nowait(10_000)
    assert behind is not None and behind.missed == 1000 and behind.resync
    log.close()
    assert await reader.next(100) is None


async def test_output_log_throttles_while_an_attached_reader_lags() -> None:
    log: OutputLog[bytes] = OutputLog(capacity=10_000, high_water=1000, low_water=200)
    reader = log.attach(replay=True)
    resumed: list[bool] = []
    while not log.throttled:
        log.append(b"x" * 100, 100)
    log.on_writable(lambda: resumed.append(True))
    assert not resumed
    batch = reader.read_nowait(10_000)
    assert batch is not None and not batch.resync and batch.missed == 0
    assert not log.throttled and resumed == [True]
    # A detached reader never holds the producer back.
    while not log.throttled:
        log.append(b"y" * 100, 100)
    reader.close()
    assert not log.throttled


async def test_shrinking_a_log_never_takes_what_a_reader_has_not_read() -> None:
    log: OutputLog[bytes] = OutputLog(capacity=100_000)
    slow = log.attach(replay=True)
    for _ in range(10):
        log.append(b"x" * 936, 936)  # 1000 bytes each
    first = slow.read_nowait(3000)
    assert first is not None and len(first.items) == 3
    log.close()
    log.shrink(2000)
    rest = slow.read_nowait(100_000)
    assert rest is not None and rest.missed == 0 and len(rest.items) == 7
    late = log.attach(replay=True)
    assert log.retained_bytes == 7000  # the first shrink kept what the slow reader needed
    slow.close()
    late.close()
    log.shrink(2000)
    assert log.retained_bytes == 2000
