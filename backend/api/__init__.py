"""The agent API: what lets the unmodified E2B SDK create, use, pause and resume capsules.

Run: ``wrenn-tui serve [--host 127.0.0.1] [--port 49990]`` (or ``ApiServer`` inside another
program), then point the SDK at it::

    E2B_API_KEY=$(wrenn-tui api-key) E2B_API_URL=http://127.0.0.1:49990 \
    E2B_SANDBOX_URL=http://127.0.0.1:49990 python agent.py

(leave ``E2B_DEBUG`` unset: the SDK's debug mode skips pause and resume).

One port serves both halves (server.py): requests with an ``E2b-Sandbox-Id`` header go to
the sandbox proxy (proxy.py), everything else to the REST API (rest.py).

REST (header ``X-API-KEY: <key>`` or ``Authorization: Bearer <key>``; the key is made on
first use in ``<config>/api-key``, mode 0600; wrong or missing: 401). Errors are
``{"code": <status>, "message": str}``.
    POST /v2/sandboxes (also /sandboxes) {"templateID", "timeout"?: s (300), "metadata"?,
        "envVars"?, "autoPause"?, "allow_internet_access"?} -> 201 {"templateID",
        "sandboxID", "clientID", "envdVersion", "envdAccessToken", "alias", "domain": null}
        once envd in the new capsule answers. "base" means our "default" template; an
        unknown template is 404. Internet access only when asked for explicitly
        (the capsule's network mode "internet"), else the isolated "none".
    POST /v2/sandboxes/{id}/connect (also /sandboxes/{id}/connect) {"timeout"?} -> 201 and
        the same body after resuming a paused capsule, 200 when it is running (the timeout
        is then only ever extended). Waits out a pause or resume under way elsewhere.
    POST /sandboxes/{id}/resume {"timeout"?} -> 201 (409 when running)
    POST /sandboxes/{id}/pause -> 204; 409 when already paused; 404 when unknown
    DELETE /sandboxes/{id} -> 204; 404 when unknown
    GET /sandboxes/{id} -> the detail: state "running" | "paused", startedAt, endAt,
        cpuCount, memoryMB, diskSizeMB, metadata, envdAccessToken, ...
    GET /v2/sandboxes?state=running,paused&metadata=k%3Dv&template=&order=&limit=&nextToken=
        -> [listed sandbox]; ``x-next-token`` header when there is more.
    GET /sandboxes -> the running ones (v1)
    POST /sandboxes/{id}/timeout {"timeout": s} -> 204;
    POST /sandboxes/{id}/refreshes {"duration"?: s} -> 204 (extends only)
    GET /sandboxes/{id}/metrics -> [one current sample from envd] ([] while paused)
    GET /health -> 200 (no key needed)
Timeouts: a running capsule whose E2B ``endAt`` passes is destroyed (E2B's default), or
paused when it was created with ``autoPause``; capsules no E2B client gave a timeout never
end by themselves. Paused capsules do not time out.

Sandbox proxy: ``E2b-Sandbox-Id: <capsule id>`` and ``E2b-Sandbox-Port: 49983`` -> the
capsule's envd (HTTP API and Connect RPC), streamed both ways. Unknown or not running: 502
``{"code": 502, "message": "The sandbox <id> was not found"}``.

Capsules made here are ordinary capsules in the same state database: the dashboard shows
them, can pause them, and ``connect`` from the SDK resumes them.
"""

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 49990
