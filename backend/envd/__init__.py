"""envd: the agent inside every capsule. This docstring is the contract the host codes against.

Run: ``python3 -m backend.envd [--host 0.0.0.0] [--port 49983]
[--metadata tcp:HOST:PORT | file:PATH] [--metadata-interval 5] [--reclaim-threshold 80]
[--reclaim-interval 2] [--ping-interval 30] [--snapshot-hold-timeout 600]
[--log-level info] [--root DIR]``. ``--root DIR`` is host mode: API paths resolve under
DIR (``/x`` is ``DIR/x``; nothing may leave DIR, by ``..`` or a symlink), metadata files go
to ``DIR/run/wrenn``, the clock, the RNG and the page cache are left alone (only logged),
and ``user`` fields are ignored (everything runs as the invoking user). Callers poll
``/health``.

Conventions
    Bodies and answers are JSON. Every error is ``{"error": "<code>", "message": "<text>"}``
    with a 4xx/5xx status; ``error`` codes are stable (``bad_json``, ``invalid_body``,
    ``invalid_field``, ``unauthorized``, ``not_found``, ``unknown_process``, ...).
    Once ``/init`` has set an access token, every request except ``GET /health`` needs header
    ``X-Access-Token: <token>`` (WebSocket: the header or ``?access_token=``), else 401.
    A ``user``/``username`` names a passwd account (default: ``defaultUser`` from /init, else
    the user envd runs as; unknown: 400 unknown_user). Relative file paths start at its home
    (from passwd: root's is ``/root``); commands without ``cwd`` start in ``defaultWorkdir``
    from /init, else in that home (``/`` if the home does not exist). An explicit ``cwd``
    must be an existing directory (400 invalid_cwd). Children get a clean environment: PATH,
    LANG, HOME, USER, LOGNAME, SHELL (+ TERM for terminals), the identity variables below,
    ``envVars`` from /init, then the request's ``env``.
    Exit codes are shell-style: 128+N when killed by signal N, with ``"signal": "SIGKILL"``.

Health and metrics
    GET /health  -> 200 {"version": "0.1.0"}                       (never needs a token)
    GET /version -> 200 {"version", "python", "mode": "guest"|"host", "uptime_s"}
    GET /metrics -> 200 {"ts": unix seconds, "cpu_count", "cpu_used_pct" (last 1 s window),
        "mem_total", "mem_used" (= MemTotal - MemAvailable), "mem_available",
        "mem_cache" (Cached), "disk_used", "disk_total" (bytes, statvfs of / or DIR),
        "reclaims", "reclaim_threshold", "snapshot_in_progress", "processes", "ptys"}

Lifecycle
    POST /init  body (all optional) {"accessToken": str, "envVars": {str: str},
        "defaultUser": str, "defaultWorkdir": abs path, "timestamp": host unix seconds,
        "instanceID": str, "templateID": str, "entropy": base64 bytes,
        "reclaimThreshold": percent in (0, 100]}
        -> 200 {"ok": true, "version", "clock_set", "entropy_added", "snapshot_in_progress":
        false, "sandbox_id", "template_id"}. Call after boot and after every resume: sets the
        clock, reseeds the RNG, merges envVars into the environment of later processes,
        and clears the snapshot hold. ``"accessToken": ""`` removes the token.
    POST /snapshot/prepare -> 200 {"ok": true, "snapshot_in_progress": true, "dropped": bool,
        "before": {"mem_used", "mem_cache", "mem_available"}, "after": {...same}}.
        Holds the reclaimer, syncs, drops the page cache (not dentries/inodes).
    POST /snapshot/abort -> 200 {"ok": true, "snapshot_in_progress": false}
        (the hold also ends on the next /init, or after --snapshot-hold-timeout).
    The reclaimer drops the page cache when mem_used/mem_total reaches the threshold and at
    least 8 MiB is cached, checking every --reclaim-interval seconds, never during a
    snapshot hold; /metrics ``reclaims`` counts drops (in host mode: would-be drops).
    Identity: ``instanceID`` and ``templateID`` (or ``envID``) from the metadata source
    (polled at start and every --metadata-interval seconds; one JSON object, unknown fields
    ignored, bad answers logged and ignored, missing values never erase known ones) or from
    /init are written to ``/run/wrenn/.WRENN_SANDBOX_ID`` and ``.WRENN_TEMPLATE_ID`` and
    exported to later processes as WRENN_SANDBOX_ID, WRENN_TEMPLATE_ID, E2B_SANDBOX_ID and
    E2B_TEMPLATE_ID.

Files
    GET /files?path=P[&username=U] -> 200 application/octet-stream, the file's bytes.
        400 is_a_directory / not_a_regular_file / invalid_path, 404 file_not_found,
        403 permission_denied / path_escape.
    POST /files?path=P[&username=U], multipart/form-data with one or more parts named
        ``file`` -> 200 [{"path": abs path, "name": basename, "type": "file"}, ...].
        Target: P itself for a single file; P/<filename> when P is a directory or ends with
        "/"; <filename> (absolute, or relative to home) without P. Parent directories are
        created. Files appear only when the whole body has arrived (temp file, fsync,
        rename); a cut-off or malformed upload leaves nothing. 507 insufficient_storage when
        the disk is full, 400 incomplete_upload / invalid_multipart / no_files /
        is_a_directory, 415 for other content types (a raw application/octet-stream body
        with ?path= is accepted too).

Processes (piped stdio; each in its own session and process group)
    POST /processes {"cmd": "shell string" | "argv": [str, ...], "env": {}, "cwd": str,
        "user": str, "stdin": bool (default false: stdin is /dev/null), "tag": str}
        -> 200 {"pid": int, "tag": str}   (tag defaults to "proc-<pid>"; 409 tag_in_use)
        ``cmd`` runs as ``/bin/bash -l -c cmd`` (``/bin/sh -c`` without bash).
    GET /processes -> 200 [{"pid", "tag", "cmd", "argv", "cwd", "user", "started_at",
        "ended_at", "alive", "exit_code", "signal", "stdin_open"}]  (recently exited included)
    GET /processes/{pid|tag} -> 200 the same object; 404 unknown_process.
    GET /processes/{pid|tag}/events[?encoding=base64|utf8][&replay=1|0] -> 200 NDJSON stream:
        {"type": "start", "pid", "tag", "cmd"}, then {"type": "stdout"|"stderr", "data": str,
        "encoding": "base64"|"utf8"} ..., {"type": "dropped"} when the stream does not
        start at the process's first byte (new subscribers get a replay of the most recent
        output: up to 1 MiB while it runs, 256 KiB once it has exited), and finally
        {"type": "exit", "exit_code", "signal"}. ``replay=0`` starts at live output. A
        subscriber that lags makes the child wait rather than lose output. The 32 most
        recently exited processes stay listed.
    POST /processes/{ref}/stdin {"data": text} or {"b64": base64} -> 200 {"ok": true, "bytes"}
        (409 stdin_closed / not_running, 429 stdin_full)
    POST /processes/{ref}/close-stdin -> 200 {"ok": true}
    POST /processes/{ref}/signal {"signal": "SIGTERM" | "TERM" | 15} (default SIGTERM; sent
        to the process group) -> 200 {"ok": true, "signal": "SIGTERM"}; 409 not_running,
        400 invalid_signal.
    POST /exec {"cmd" | "argv", "env", "cwd", "user", "timeout": seconds (default 60,
        0 = none), "input": text for stdin} -> 200 {"exit_code", "stdout", "stderr" (text,
        undecodable bytes replaced), "signal", "timed_out", "truncated", "pid",
        "duration_ms"}. On timeout the process group is killed and exit_code is 124.
        Output beyond 16 MiB per stream is cut (truncated: true).
        ``POST /exec?stream=1[&encoding=utf8|base64]`` answers with the NDJSON events above
        (the exit event also has "timed_out").

Ports: WebSocket /tcp?port=N -> one TCP connection to 127.0.0.1:N in the guest, its bytes as
    binary messages both ways; closed with code 4404 (reason says why) when nothing listens,
    4400 for a bad port (envd's own port is refused). Ends when either side closes.

Terminals: WebSocket /pty, JSON text frames; GET /pty lists sessions:
        [{"tag", "pid", "cmd", "cols", "rows", "cwd", "user", "alive", "exit_code",
        "signal", "attached", "created_at"}]
    client -> server
        {"type": "start", "cmd"?: program, "args"?: [str], "cols", "rows", "env"?, "cwd"?,
         "user"?, "tag"?}   without cmd: the user's login shell from passwd, as a login
                            shell; TERM=xterm-256color; cols/rows default 80x24
        {"type": "connect", "tag"}        reattach: recent output (256 KiB ring) is
                                          replayed first, then live output follows
        {"type": "input", "data": text} or {"type": "input", "b64": base64}
        {"type": "resize", "cols", "rows"}        1..1000 each
        {"type": "kill", "signal"?}               default SIGKILL, to the process group
        {"type": "detach"}                        stop receiving; the session keeps running
        {"type": "ping"} / {"type": "pong"}
    server -> client
        {"type": "started", "tag", "pid", "cols", "rows"}
        {"type": "connected", "tag", "pid", "cols", "rows", "alive"}
        {"type": "output", "data": text}          UTF-8, decoded incrementally
        {"type": "exit", "tag", "exit_code", "signal"}
        {"type": "detached", "tag"}
        {"type": "error", "error": code, "message", "request"?: the type that failed}
        {"type": "ping"} every --ping-interval seconds; {"type": "pong"} answers a ping
    Tags default to "pty-<8 hex digits>"; a live session's tag cannot be reused
    (``tag_in_use``). A connection drives one session at a time (``already_attached``);
    several connections may watch one session. Closing the socket only detaches; the shell
    keeps running. Bad messages get an ``error`` message (codes: bad_json,
    invalid_message, unknown_type, invalid_field, invalid_size, invalid_cwd,
    command_not_found, not_attached, unknown_session, invalid_signal, not_running,
    input_full) and never close the socket. After ``exit`` the socket stays open and may
    start or connect again; ``connect`` to an exited session (the 32 latest are kept, with
    their last 64 KiB of output) replays it and sends ``exit``. A client that reads slowly
    gets output coalesced into bigger messages while the terminal's program is paused;
    nothing is lost.
"""

__version__ = "0.1.0"
