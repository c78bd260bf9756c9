"""envd's second façade: the Connect RPC services the E2B SDK speaks, on envd's own managers.

Mounted beside the HTTP API on the same port (``routes(envd)``), behind the same access
token middleware (``X-Access-Token``). Only the JSON codec, over HTTP/1.1, uncompressed:
exactly what the E2B Python SDK sends. The schema is in ``proto/`` (written from the SDK's
descriptors; tests/e2b/test_proto.py keeps the two in step).

Services (``POST /<package>.<Service>/<Method>``)
    process.Process
        Start (server stream)   StartRequest{process{cmd, args, envs, cwd}, pty?{size}, tag?,
                                stdin?} -> ProcessEvent start{pid}, data{stdout|stderr|pty}*,
                                end{exitCode, exited, status}; keepalive{} while idle when the
                                request has ``Keepalive-Ping-Interval: <seconds>``.
                                With ``pty`` the process is a PtyManager session: the
                                dashboard's PTY pane lists and attaches to it by its tag.
                                Connect-Timeout-Ms bounds the process itself (E2B semantics).
        Connect (server stream) {process: {pid | tag}} -> live output from now on, then end.
        List                    -> {processes: [{config, pid, tag}]} (running ones, PTYs too)
        SendInput               {process, input: {stdin | pty: base64}}
        StreamInput (client stream) start{process}, then data{input}*
        Update                  {process, pty: {size: {cols, rows}}} resizes a terminal
        SendSignal              {process, signal: SIGNAL_SIGTERM | SIGNAL_SIGKILL}
        CloseStdin              {process}
    filesystem.Filesystem
        Stat, MakeDir, Move, ListDir{path, depth}, Remove -> EntryInfo{name, type, path, size,
        mode, permissions, owner, group, modifiedTime, symlinkTarget?, isSymlink}
        WatchDir (server stream) {path, recursive, includeEntry} -> start{}, filesystem{name,
        type, entry?}*; CreateWatcher / GetWatcherEvents / RemoveWatcher poll the same events.

The acting user is ``Authorization: Basic base64("<user>:")`` (default: envd's default user);
relative paths start at that user's home. Errors are Connect errors (``not_found``,
``invalid_argument``, ``already_exists``, ``permission_denied``, ``failed_precondition``,
``resource_exhausted``, ``deadline_exceeded``, ``unimplemented``, ``internal``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

from .filesystem import FilesystemService
from .process import ProcessService
from .wire import service_routes

if TYPE_CHECKING:
    from ..service import Envd

PROCESS_SERVICE = "process.Process"
FILESYSTEM_SERVICE = "filesystem.Filesystem"


def routes(envd: Envd) -> list[Route]:
    """The Connect routes over ``envd``'s managers (one implementation, two façades)."""
    process = ProcessService(envd.processes, envd.ptys, envd.launcher)
    filesystem = FilesystemService(envd.resolver, envd.accounts, envd.state)
    return [
        *service_routes(PROCESS_SERVICE, process.rpcs()),
        *service_routes(FILESYSTEM_SERVICE, filesystem.rpcs()),
    ]


__all__ = ["FILESYSTEM_SERVICE", "PROCESS_SERVICE", "routes"]
