"""``process.Process`` on envd's own ProcessManager and PtyManager.

A Start with ``pty`` set becomes a PtyManager session, so it shows in ``GET /pty`` and the
dashboard can attach to it by tag; a session the dashboard started is listed here and can be
reached by pid or tag. Semantics follow E2B's envd where the SDK depends on them:

- a Connect-Timeout-Ms on Start bounds the process, not only the stream: at the deadline the
  process group is killed (even when the client has gone), as E2B does;
- Connect streams live output only (no replay), then the end event;
- the end event carries Go's exit status: ``exitCode`` -1, ``exited`` false and
  ``status`` "signal: killed" for a signal; ``exitCode`` N and "exit status N" otherwise;
- a process that has exited counts as not found for input, signals and resizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import weakref
from collections.abc import AsyncGenerator, AsyncIterator

from ..errors import ApiError
from ..processes import CommandSpec, ManagedProcess, ProcessManager
from ..pty_sessions import DEFAULT_COLS, DEFAULT_ROWS, PtyManager, PtySession, PtyStartRequest
from ..spawn import Launcher
from ..validation import ascii_digits, check_env, check_tag
from .wire import (
    Call,
    ClientStreamRpc,
    Json,
    Msg,
    Rpc,
    RpcError,
    ServerStreamRpc,
    UnaryRpc,
    b64encode,
    invalid,
)

SIGNALS = {"SIGNAL_UNSPECIFIED": 0, "SIGNAL_SIGTERM": 15, "SIGNAL_SIGKILL": 9}
OUTPUT_BATCH = 64 * 1024
KEEPALIVE: Json = {"event": {"keepalive": {}}}

Target = ManagedProcess | PtySession


def start_event(pid: int) -> Json:
    return {"event": {"start": {"pid": pid}}}


def data_event(stream: str, data: bytes) -> Json:
    return {"event": {"data": {stream: b64encode(data)}}}


def end_event(exit_code: int | None, signal_name: str | None) -> Json:
    if signal_name is not None:
        try:
            description = signal.strsignal(signal.Signals[signal_name]) or signal_name
        except KeyError:
            description = signal_name
        return {
            "event": {
                "end": {"exitCode": -1, "exited": False, "status": f"signal: {description.lower()}"}
            }
        }
    code = exit_code or 0
    return {"event": {"end": {"exitCode": code, "exited": True, "status": f"exit status {code}"}}}


def _config_json(cmd: str, args: list[str], envs: dict[str, str], cwd: str | None) -> Json:
    config: Json = {"cmd": cmd, "args": args, "envs": envs}
    if cwd is not None:
        config["cwd"] = cwd
    return config


class ProcessService:
    def __init__(self, processes: ProcessManager, ptys: PtyManager, launcher: Launcher) -> None:
        self.processes = processes
        self.ptys = ptys
        self.launcher = launcher
        # The config as the SDK gave it (envs included), for List; envd keeps only argv.
        self._configs: weakref.WeakKeyDictionary[Target, Json] = weakref.WeakKeyDictionary()

    def rpcs(self) -> dict[str, Rpc]:
        return {
            "Start": ServerStreamRpc(self.start, keepalive=KEEPALIVE),
            "Connect": ServerStreamRpc(self.connect, keepalive=KEEPALIVE),
            "List": UnaryRpc(self.list),
            "SendInput": UnaryRpc(self.send_input),
            "StreamInput": ClientStreamRpc(self.stream_input),
            "Update": UnaryRpc(self.update),
            "SendSignal": UnaryRpc(self.send_signal),
            "CloseStdin": UnaryRpc(self.close_stdin),
        }

    # -- lookup -----------------------------------------------------------------------------

    def find(self, selector: Msg) -> Target:
        which = selector.oneof("pid", "tag")
        if which == "pid":
            pid = selector.uint("pid")
            targets: list[Target] = [*self.processes.list(), *self.ptys.list()]
            matches = [t for t in targets if t.pid == pid]
            if not matches:
                raise RpcError("not_found", f"process with pid {pid} not found")
            # A pid the kernel reused: the live process is meant, not the one kept after exit.
            return min(matches, key=lambda t: t.exit_code is not None)
        if which == "tag":
            tag = selector.text("tag")
            with contextlib.suppress(ApiError):
                return self.ptys.get(tag)
            if not ascii_digits(tag):
                with contextlib.suppress(ApiError):
                    return self.processes.get(tag)
            raise RpcError("not_found", f"process with tag {tag!r} not found")
        raise invalid("process selector needs a pid or a tag")

    def find_alive(self, selector: Msg) -> Target:
        target = self.find(selector)
        if target.exit_code is not None:
            raise RpcError("not_found", f"process {target.pid} has exited")
        return target

    def config_of(self, target: Target) -> Json:
        known = self._configs.get(target)
        if known is not None:
            return known
        argv = target.argv
        if isinstance(target, PtySession) and argv and argv[0].startswith("-"):
            # A login shell's argv[0] is "-bash"; the program is the session's command.
            return _config_json(target.command, argv[1:], {}, target.cwd)
        return _config_json(argv[0] if argv else "", argv[1:], {}, target.cwd)

    # -- Start / Connect --------------------------------------------------------------------

    def _spawn(self, request: Msg, user: str | None) -> Target:
        config = request.msg("process")
        cmd = config.text("cmd")
        if not cmd:
            raise invalid("process.cmd must not be empty")
        args = config.str_list("args")
        envs = check_env(config.str_map("envs"))
        cwd = config.opt_str("cwd") or None
        raw_tag = request.opt_str("tag")
        tag = check_tag(raw_tag) if raw_tag else None
        pty = request.opt_msg("pty")
        target: Target
        if pty is not None:
            size = pty.msg("size")
            target = self.ptys.start(
                PtyStartRequest(
                    cmd=cmd,
                    args=args,
                    cols=size.uint("cols") or DEFAULT_COLS,
                    rows=size.uint("rows") or DEFAULT_ROWS,
                    env=envs,
                    cwd=cwd,
                    user=user,
                    tag=tag,
                )
            )
        else:
            argv = [cmd, *args]
            # The SDK runs commands as `/bin/bash -l -c CMD`: kept as a shell string when it
            # is exactly what envd would run, so the dashboard shows the command itself.
            shell = argv[-1] if len(argv) > 1 else ""
            as_shell = self.launcher.shell_argv(shell) == argv
            spec = CommandSpec(
                argv=None if as_shell else argv,
                cmd=shell if as_shell else None,
                env=envs,
                cwd=cwd,
                user=user,
                tag=tag,
            )
            # Unset means open: SDKs older than envd 0.3.0 always had stdin.
            stdin = request.opt_bool("stdin")
            target = self.processes.start(spec, stdin=True if stdin is None else stdin)
        self._configs[target] = _config_json(cmd, args, envs, cwd)
        return target

    async def start(self, request: Msg, call: Call) -> AsyncGenerator[Json, None]:
        target = self._spawn(request, call.user)
        remaining = call.remaining()
        if remaining is not None:
            asyncio.get_running_loop().call_later(remaining, _kill_if_alive, target)
        async for event in self._events(target, replay=True):
            yield event

    async def connect(self, request: Msg, call: Call) -> AsyncGenerator[Json, None]:
        target = self.find(request.msg("process"))
        async for event in self._events(target, replay=False):
            yield event

    async def _events(self, target: Target, *, replay: bool) -> AsyncIterator[Json]:
        if isinstance(target, PtySession):
            async for event in _pty_events(target, replay):
                yield event
            return
        async for item in target.events(replay=replay, encoding="base64"):
            kind = item["type"]
            if kind == "start":
                yield start_event(target.pid)
            elif kind in ("stdout", "stderr"):
                yield {"event": {"data": {kind: item["data"]}}}
            elif kind == "exit":
                yield end_event(target.exit_code, target.signal)

    # -- unary ------------------------------------------------------------------------------

    async def list(self, request: Msg, call: Call) -> Json:
        targets: list[Target] = [*self.processes.list(), *self.ptys.list()]
        processes = [
            {"config": self.config_of(t), "pid": t.pid, "tag": t.tag}
            for t in targets
            if t.exit_code is None
        ]
        return {"processes": processes}

    async def send_input(self, request: Msg, call: Call) -> Json:
        target = self.find_alive(request.msg("process"))
        _write(target, request.msg("input"))
        return {}

    async def stream_input(self, requests: AsyncIterator[Msg], call: Call) -> Json:
        target: Target | None = None
        async for message in requests:
            which = message.oneof("start", "data", "keepalive")
            if which == "start":
                if target is not None:
                    raise invalid("the input stream was already started")
                target = self.find_alive(message.msg("start").msg("process"))
            elif which == "data":
                if target is None:
                    raise invalid("the input stream must begin with a start event")
                _write(target, message.msg("data").msg("input"))
        return {}

    async def update(self, request: Msg, call: Call) -> Json:
        target = self.find_alive(request.msg("process"))
        pty = request.opt_msg("pty")
        if pty is None:
            return {}
        if not isinstance(target, PtySession):
            raise RpcError("failed_precondition", f"process {target.pid} has no terminal")
        size = pty.msg("size")
        target.resize(size.uint("cols"), size.uint("rows"))
        return {}

    async def send_signal(self, request: Msg, call: Call) -> Json:
        target = self.find_alive(request.msg("process"))
        number = request.enum("signal", SIGNALS)
        if number == 0:
            raise invalid("signal must be SIGNAL_SIGTERM or SIGNAL_SIGKILL")
        sig = signal.Signals(number)
        if isinstance(target, PtySession):
            target.kill(sig)
        else:
            target.send_signal(sig)
        return {}

    async def close_stdin(self, request: Msg, call: Call) -> Json:
        target = self.find_alive(request.msg("process"))
        if isinstance(target, PtySession):
            raise RpcError("failed_precondition", "a terminal has no stdin to close")
        target.close_stdin()
        return {}


def _write(target: Target, data: Msg) -> None:
    which = data.oneof("stdin", "pty")
    payload = data.opt_bytes(which) if which is not None else None
    if which is None or payload is None:
        raise invalid("input needs stdin or pty bytes")
    if isinstance(target, PtySession):
        if which != "pty":
            raise RpcError("failed_precondition", "send terminal input as pty bytes")
        target.write(payload)
    else:
        if which != "stdin":
            raise RpcError("failed_precondition", f"process {target.pid} has no terminal")
        target.write_stdin(payload)


def _kill_if_alive(target: Target) -> None:
    if target.exit_code is not None:
        return
    with contextlib.suppress(ApiError):
        if isinstance(target, PtySession):
            target.kill(signal.SIGKILL)
        else:
            target.send_signal(signal.SIGKILL)


async def _pty_events(session: PtySession, replay: bool) -> AsyncIterator[Json]:
    reader = session.attach(replay=replay)
    try:
        yield start_event(session.pid)
        while (batch := await reader.next(OUTPUT_BATCH)) is not None:
            data = b"".join(batch.items)
            if data:
                yield data_event("pty", data)
        await session.done.wait()
        yield end_event(session.exit_code, session.signal)
    finally:
        reader.close()
