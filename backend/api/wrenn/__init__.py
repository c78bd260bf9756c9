"""Wrenn's own API (``/v1``), so the unmodified Wrenn SDK (``wrenn`` 0.3.0, sync and async
clients) drives wrenn-tui: ``WRENN_API_KEY=$(wrenn-tui api-key)
WRENN_BASE_URL=http://127.0.0.1:49990``. Same port, same key and same capsules as E2B's API.

The SDK's pydantic models are the wire contract. Auth: ``X-API-Key``; errors are
``{"error": {"code", "message"}}`` with Wrenn's codes (errors.py), so the SDK raises its own
typed exceptions; a capsule in the wrong state is 409 ``invalid_state``; a failure of the
host side (VMM, envd) is 502 ``agent_error``.

Capsules (lifecycle.py)
    POST /v1/capsules {"template"?: name ("minimal-ubuntu"/"minimal" = our "default"),
        "vcpus"?, "memory_mb"?, "timeout_sec"?: inactivity TTL before auto-pause (0: never;
        1..59 become 60), "metadata"?} -> 201 Capsule once it runs, or with status "starting"
        after 20 s (the start goes on; poll GET). A snapshot's size is fixed (asking another
        is 400).
    GET /v1/capsules, GET|DELETE /v1/capsules/{id}, POST /v1/capsules/{id}/pause|resume
        (-> the Capsule), POST /v1/capsules/{id}/ping (-> 204, resets the inactivity timer).
    POST /v1/snapshots[?overwrite=true] {"sandbox_id", "name"?} -> 201 Template: the
        capsule (running: stopped only while copied; or paused) saved as a template;
        GET /v1/snapshots[?type=base|snapshot]; DELETE /v1/snapshots/{name} (409 while a
        capsule uses it; base templates are 403).
Inside a capsule (guest.py, sockets.py; the capsule must be running, else 409)
    POST /v1/capsules/{id}/exec {"cmd", "args"?, "timeout_sec"? (30), "envs"?, "cwd"?,
        "background"?, "tag"?} -> 200 {stdout, stderr, exit_code, duration_ms} or, in the
        background, 202 {pid, tag}. GET .../processes, DELETE .../processes/{pid|tag}.
    POST .../files/read|stream/read {"path"} -> the bytes, streamed; POST
        .../files/write|stream/write multipart {"path", then "file"} streamed into place;
        POST .../files/list {"path", "depth"?}, .../files/mkdir, .../files/remove {"path"}.
    WebSockets .../exec/stream, .../processes/{selector}/stream, .../pty (sockets.py).
Watching (observe.py)
    GET /v1/capsules/{id}/metrics?range=5m|10m|1h|2h|6h|12h|24h -> the sampler's history
        (cpu_pct of the guest, mem_bytes = the VMM's RSS; disk_bytes on the last point).
    GET /v1/capsules/stats?range=5m|1h|6h|24h|30d, GET /v1/capsules/usage?from=&to= ->
        reservations (running capsules, vCPUs, MiB) as this agent recorded them while it ran.
    GET /v1/events/stream -> server-sent events from the capsule event log.
Ports (ports.py): a request whose Host is ``{port}-{capsule id}.<anything>`` (the SDK's
    ``get_url(port)``) goes to that port on the capsule's loopback through envd's /tcp tunnel.
Accounts, teams, API keys, hosts and channels: 404 naming what is not provided.
"""
