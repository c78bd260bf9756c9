"""Health, metrics, /init, auth, snapshots and the reclaimer, over real HTTP."""

from __future__ import annotations

import base64
import signal
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

import httpx
import pytest

from backend.envd import __version__

from .conftest import Envd, wait_for

METRIC_KEYS = {
    "ts": float,
    "cpu_count": int,
    "cpu_used_pct": float,
    "mem_total": int,
    "mem_used": int,
    "mem_available": int,
    "mem_cache": int,
    "disk_used": int,
    "disk_total": int,
    "reclaims": int,
    "snapshot_in_progress": bool,
}


def test_health_and_version(client: httpx.Client) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"version": __version__}
    v = client.get("/version").json()
    assert v["version"] == __version__
    assert v["mode"] == "host"


def test_metrics_report_every_documented_key(client: httpx.Client) -> None:
    r = client.get("/metrics")
    assert r.status_code == 200
    m = r.json()
    for key, kind in METRIC_KEYS.items():
        assert isinstance(m[key], kind), (key, m[key])
    assert abs(m["ts"] - time.time()) < 5
    assert 0 <= m["cpu_used_pct"] <= 100
    assert m["cpu_count"] >= 1
    assert 0 < m["mem_used"] < m["mem_total"]
    # Read within one request, so the identity holds up to what moved between two reads.
    assert abs(m["mem_total"] - m["mem_available"] - m["mem_used"]) < 64 * 1024 * 1024
    assert 0 < m["disk_used"] <= m["disk_total"]


def test_metrics_answer_at_once_without_sampling(client: httpx.Client) -> None:
    started = time.monotonic()
    for _ in range(20):
        assert client.get("/metrics").status_code == 200
    assert time.monotonic() - started < 1.0


def test_unknown_routes_and_methods_are_json_errors(client: httpx.Client) -> None:
    r = client.get("/no/such/route")
    assert r.status_code == 404
    assert r.json()["error"] == "not_found"
    r = client.delete("/metrics")
    assert r.status_code == 405
    assert r.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{not json", "bad_json"),
        (b"[1, 2, 3]", "invalid_body"),
        (b'"a string"', "invalid_body"),
        (b'{"timestamp": "yesterday"}', "invalid_field"),
        (b'{"envVars": {"A": 1}}', "invalid_field"),
        (b'{"entropy": "not base64!"}', "invalid_field"),
        (b'{"reclaimThreshold": true}', "invalid_field"),
        (b"\xff\xfe\x00", "bad_json"),
    ],
)
def test_bad_init_bodies_are_400(client: httpx.Client, body: bytes, code: str) -> None:
    r = client.post("/init", content=body)
    assert r.status_code == 400
    assert r.json()["error"] == code
    assert r.json()["message"]
    assert client.get("/health").status_code == 200


def test_init_accepts_an_empty_body(client: httpx.Client) -> None:
    r = client.post("/init")
    assert r.status_code == 200
    assert r.json()["ok"] is True


def test_init_in_host_mode_skips_clock_and_entropy(client: httpx.Client) -> None:
    r = client.post(
        "/init",
        json={"timestamp": time.time() + 3600, "entropy": base64.b64encode(b"x" * 32).decode()},
    )
    assert r.status_code == 200
    assert r.json()["clock_set"] is False
    assert r.json()["entropy_added"] is False
    assert abs(time.time() - client.get("/metrics").json()["ts"]) < 5


def test_token_guards_everything_but_health(envd_factory: Callable[..., Envd]) -> None:
    envd = envd_factory()
    with envd.client() as c:
        assert c.post("/init", json={"accessToken": "s3cret"}).status_code == 200
        for method, path in (
            ("GET", "/metrics"),
            ("GET", "/version"),
            ("POST", "/init"),
            ("GET", "/processes"),
            ("GET", "/files?path=/x"),
            ("GET", "/nonexistent"),
            ("POST", "/exec"),
        ):
            r = c.request(method, path)
            assert r.status_code == 401, path
            assert r.json()["error"] == "unauthorized"
        assert c.get("/metrics", headers={"X-Access-Token": "wrong"}).status_code == 401
        assert c.get("/metrics", headers={"X-Access-Token": "s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200
        # A later /init needs the current token, and may rotate it.
        assert c.post("/init", json={"accessToken": "new"}).status_code == 401
        r = c.post("/init", json={"accessToken": "new"}, headers={"X-Access-Token": "s3cret"})
        assert r.status_code == 200
        assert c.get("/metrics", headers={"X-Access-Token": "s3cret"}).status_code == 401
        assert c.get("/metrics", headers={"X-Access-Token": "new"}).status_code == 200


def test_init_env_vars_and_ids_reach_new_processes(envd_factory: Callable[..., Envd]) -> None:
    envd = envd_factory()
    with envd.client() as c:
        r = c.post(
            "/init",
            json={"envVars": {"GREETING": "hello"}, "instanceID": "sb-42", "templateID": "tpl-7"},
        )
        assert r.json()["sandbox_id"] == "sb-42"
        out = c.post(
            "/exec",
            json={"cmd": "echo $GREETING $WRENN_SANDBOX_ID $E2B_SANDBOX_ID $WRENN_TEMPLATE_ID"},
        ).json()
        assert out["stdout"] == "hello sb-42 sb-42 tpl-7\n"
    run = envd.root / "run" / "wrenn"
    assert (run / ".WRENN_SANDBOX_ID").read_text() == "sb-42"
    assert (run / ".WRENN_TEMPLATE_ID").read_text() == "tpl-7"


def test_unknown_default_user_is_ignored_in_host_mode(client: httpx.Client) -> None:
    r = client.post("/init", json={"defaultUser": "nobody-here"})
    assert r.status_code == 200
    out = client.post("/exec", json={"cmd": "id -un"}).json()
    assert out["exit_code"] == 0


def test_snapshot_prepare_abort_and_init(envd_factory: Callable[..., Envd]) -> None:
    envd = envd_factory()
    with envd.client() as c:
        r = c.post("/snapshot/prepare")
        assert r.status_code == 200
        body = r.json()
        assert body["dropped"] is False  # host mode never touches the host's caches
        assert body["snapshot_in_progress"] is True
        for phase in ("before", "after"):
            assert set(body[phase]) == {"mem_used", "mem_cache", "mem_available"}
            assert all(isinstance(v, int) and v > 0 for v in body[phase].values())
        assert c.get("/metrics").json()["snapshot_in_progress"] is True
        assert c.post("/snapshot/abort").json() == {"ok": True, "snapshot_in_progress": False}
        assert c.get("/metrics").json()["snapshot_in_progress"] is False
        c.post("/snapshot/prepare")
        assert c.post("/init", json={}).json()["snapshot_in_progress"] is False
        assert c.get("/metrics").json()["snapshot_in_progress"] is False


def test_reclaimer_counts_drops_above_the_threshold_but_not_during_a_snapshot(
    envd_factory: Callable[..., Envd],
) -> None:
    envd = envd_factory("--reclaim-threshold", "0.01", "--reclaim-interval", "0.1")
    with envd.client() as c:
        first = wait_for(lambda: c.get("/metrics").json()["reclaims"] >= 2, timeout=5)
        assert first
        c.post("/snapshot/prepare")
        time.sleep(0.15)  # let a check that was already past the flag finish
        held = c.get("/metrics").json()["reclaims"]
        time.sleep(0.6)
        assert c.get("/metrics").json()["reclaims"] == held
        c.post("/snapshot/abort")
        wait_for(lambda: c.get("/metrics").json()["reclaims"] > held, timeout=5)


def test_reclaim_threshold_can_be_set_by_init(envd_factory: Callable[..., Envd]) -> None:
    envd = envd_factory("--reclaim-interval", "0.1")
    with envd.client() as c:
        time.sleep(0.5)
        assert c.get("/metrics").json()["reclaims"] == 0  # the host is below 80% here
        assert c.post("/init", json={"reclaimThreshold": 0.01}).status_code == 200
        assert c.get("/metrics").json()["reclaim_threshold"] == 0.01
        wait_for(lambda: c.get("/metrics").json()["reclaims"] >= 1, timeout=5)


def test_bad_command_line_exits_with_a_usage_error(envd_factory: Callable[..., Envd]) -> None:
    with pytest.raises(RuntimeError, match="exited with 2"):
        envd_factory("--metadata", "http://nope")
    with pytest.raises(RuntimeError, match="exited with 2"):
        envd_factory("--reclaim-threshold", "0")


def test_sigterm_ends_envd_at_once_and_the_date_header_keeps_time(
    envd_factory: Callable[..., Envd],
) -> None:
    """uvicorn's housekeeping wakes once a second here (not ten times): the Date header must
    still move on, and a SIGTERM must still end envd without waiting for the next wake-up
    (three instances, so a lucky phase of the 1 s wake-up cannot pass for a prompt exit)."""
    instances = [envd_factory(name=f"root-{i}") for i in range(3)]
    with instances[0].client() as c:
        first = c.get("/health").headers["date"]
        time.sleep(2.2)
        second = c.get("/health").headers["date"]
    assert parsedate_to_datetime(second) > parsedate_to_datetime(first)
    for instance in instances:
        started = time.monotonic()
        instance.proc.terminate()
        instance.proc.wait(5)
        assert time.monotonic() - started < 0.8, instance.log()
        # uvicorn re-raises the signal it shut down on.
        assert instance.proc.returncode == -signal.SIGTERM, instance.log()
