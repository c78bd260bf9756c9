"""Child processes with piped stdio, independent of any wire protocol.

A process is started from an argv list or a shell string, in its own session and process
group. Its stdout and stderr are read on the event loop into an :class:`OutputLog`, which
keeps the most recent output (so a subscriber that arrives late still sees a short command's
whole output) and slows the child down instead of buffering without bound while a subscriber
lags. Processes outlive the request that started them; finished ones are kept for a while so
their exit code can still be asked for.
"""

from __future__ import annotations

import asyncio
import base64
import codecs
import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import IO, Any, Literal

from .buffers import LogReader, OutputLog
from .errors import ApiError, bad_request, conflict, not_found
from .fdio import BufferFull, FdReader, FdWriter, wait_exit
from .paths import PathResolver
from .spawn import ExitedChildren, Launcher, exit_status, kill_group
from .validation import Fields, ascii_digits, check_env, check_tag

log = logging.getLogger("envd.processes")

# How long output may pause after the child exits before a grandchild that inherited the
# pipes is assumed to hold them open for good.
EXIT_GRACE = 0.25
EVENT_BATCH = 256 * 1024
# Output kept per finished process, for late subscribers (bounded: finished ones pile up).
RETAINED_AFTER_EXIT = 256 * 1024
TIMEOUT_EXIT_CODE = 124

Encoding = Literal["base64", "utf8"]


@dataclass(frozen=True)
class CommandSpec:
    argv: list[str] | None = None
    cmd: str | None = None
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    tag: str | None = None

    @classmethod
    def from_fields(cls, f: Fields) -> CommandSpec:
        argv = f.opt_str_list("argv")
        cmd = f.opt_str("cmd")
        if (argv is None) == (cmd is None):
            raise bad_request("give exactly one of 'cmd' (a shell string) or 'argv' (a list)")
        if argv is not None and not argv:
            raise bad_request("'argv' must not be empty")
        if cmd is not None and not cmd.strip():
            raise bad_request("'cmd' must not be empty")
        if any("\0" in a for a in argv or [cmd or ""]):
            raise bad_request("command must not contain NUL bytes")
        env = f.opt_str_map("env")
        tag = f.opt_str("tag")
        return cls(
            argv=argv,
            cmd=cmd,
            env=check_env(env) if env is not None else None,
            cwd=f.opt_str("cwd") or None,
            user=f.opt_str("user") or None,
            tag=check_tag(tag) if tag is not None else None,
        )

    @property
    def display(self) -> str:
        return self.cmd if self.cmd is not None else shlex.join(self.argv or [])


@dataclass(frozen=True)
class StartRequest:
    command: CommandSpec
    stdin: bool = False

    @classmethod
    def parse(cls, body: object) -> StartRequest:
        f = Fields(body)
        return cls(command=CommandSpec.from_fields(f), stdin=bool(f.opt_bool("stdin")))


@dataclass(frozen=True)
class ExecRequest:
    command: CommandSpec
    timeout: float | None = 60.0
    input: bytes | None = None

    @classmethod
    def parse(cls, body: object) -> ExecRequest:
        f = Fields(body)
        timeout = f.opt_number("timeout") if "timeout" in f else 60.0
        if timeout is not None and timeout < 0:
            raise bad_request("timeout must be >= 0 seconds (0 = no limit)", "invalid_field")
        text = f.opt_str("input")
        return cls(
            command=CommandSpec.from_fields(f),
            timeout=timeout or None,
            input=text.encode() if text is not None else None,
        )


@dataclass(frozen=True)
class OutputEvent:
    stream: Literal["stdout", "stderr"]
    data: bytes


class EventEncoder:
    """Turns output into JSON events; UTF-8 decoding is incremental per stream."""

    def __init__(self, encoding: Encoding) -> None:
        self.encoding = encoding
        self._decoders = {
            "stdout": codecs.getincrementaldecoder("utf-8")(errors="replace"),
            "stderr": codecs.getincrementaldecoder("utf-8")(errors="replace"),
        }

    def encode(self, stream: str, data: bytes) -> dict[str, Any] | None:
        if self.encoding == "base64":
            return {"type": stream, "data": base64.b64encode(data).decode(), "encoding": "base64"}
        text = self._decoders[stream].decode(data)
        return {"type": stream, "data": text, "encoding": "utf8"} if text else None

    def flush(self) -> list[dict[str, Any]]:
        if self.encoding == "base64":
            return []
        out = []
        for stream, decoder in self._decoders.items():
            text = decoder.decode(b"", final=True)
            if text:
                out.append({"type": stream, "data": text, "encoding": "utf8"})
        return out


def coalesce(items: list[OutputEvent]) -> list[OutputEvent]:
    out: list[OutputEvent] = []
    for item in items:
        if out and out[-1].stream == item.stream:
            out[-1] = OutputEvent(item.stream, out[-1].data + item.data)
        else:
            out.append(item)
    return out


class ManagedProcess:
    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        *,
        tag: str,
        spec: CommandSpec,
        argv: list[str],
        cwd: str,
        user: str,
        buffer_bytes: int,
        on_exit: Callable[[ManagedProcess], None],
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.tag = tag
        self.command = spec.display
        self.argv = argv
        self.cwd = cwd
        self.user = user
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.log: OutputLog[OutputEvent] = OutputLog(
            buffer_bytes, high_water=buffer_bytes // 4, low_water=buffer_bytes // 16
        )
        self.done = asyncio.Event()
        self._on_exit = on_exit
        # Our own duplicates, so Popen's file objects can go and nothing else closes them.
        assert popen.stdout is not None and popen.stderr is not None
        self._fds: list[int] = []
        self._readers: list[FdReader] = []
        streams: tuple[tuple[Literal["stdout", "stderr"], IO[bytes]], ...] = (
            ("stdout", popen.stdout),
            ("stderr", popen.stderr),
        )
        for name, pipe in streams:
            fd = os.dup(pipe.fileno())
            pipe.close()
            self._fds.append(fd)
            self._readers.append(FdReader(fd, self._sink(name), self.log))
        popen.stdout = popen.stderr = None
        self.stdin: FdWriter | None = None
        if popen.stdin is not None:
            self.stdin = FdWriter(os.dup(popen.stdin.fileno()), limit=16 * 1024 * 1024)
            popen.stdin.close()
            popen.stdin = None
        self._task = asyncio.create_task(self._supervise(), name=f"process-{self.pid}")

    def _sink(self, stream: Literal["stdout", "stderr"]) -> Callable[[bytes], None]:
        def sink(data: bytes) -> None:
            self.log.append(OutputEvent(stream, data), len(data))

        return sink

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def info(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "tag": self.tag,
            "cmd": self.command,
            "argv": self.argv,
            "cwd": self.cwd,
            "user": self.user,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "alive": self.alive,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "stdin_open": self.stdin is not None and not self.stdin.closed,
        }

    def exit_event(self) -> dict[str, Any]:
        return {"type": "exit", "exit_code": self.exit_code, "signal": self.signal}

    async def _supervise(self) -> None:
        for reader in self._readers:
            reader.start()
        try:
            returncode = await wait_exit(self.pid)
        except asyncio.CancelledError:
            self._release()
            raise
        # Stops Popen from ever reaping this pid again, which could hit a recycled pid.
        self.popen.returncode = returncode
        pending = [r.finished for r in self._readers if not r.finished.done()]
        while pending:
            before = self.log.end_offset
            _, still = await asyncio.wait(pending, timeout=EXIT_GRACE)
            pending = list(still)
            if pending and self.log.end_offset == before and not self.log.throttled:
                break
        self._release()
        self.exit_code, self.signal = exit_status(returncode)
        self.ended_at = time.time()
        self.log.close()
        self.done.set()
        self._on_exit(self)

    def _release(self) -> None:
        for reader in self._readers:
            reader.finish()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if self.stdin is not None:
            self.stdin.abort()

    def write_stdin(self, data: bytes) -> None:
        if not self.alive:
            raise conflict(f"process {self.pid} has exited", "not_running")
        if self.stdin is None:
            raise conflict(
                f"process {self.pid} was started without stdin (start it with stdin: true)",
                "stdin_closed",
            )
        try:
            self.stdin.write(data)
        except BufferFull as exc:
            raise ApiError(429, "stdin_full", str(exc)) from None
        except BrokenPipeError:
            raise conflict(f"stdin of process {self.pid} is closed", "stdin_closed") from None

    def close_stdin(self) -> None:
        if self.stdin is None:
            raise conflict(f"process {self.pid} has no stdin to close", "stdin_closed")
        self.stdin.close_fd()

    def send_signal(self, sig: signal.Signals) -> None:
        if not self.alive:
            raise conflict(f"process {self.pid} has exited", "not_running")
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                raise conflict(f"process {self.pid} has exited", "not_running") from None

    async def events(
        self, *, replay: bool = True, encoding: Encoding = "base64"
    ) -> AsyncIterator[dict[str, Any]]:
        """start, stdout/stderr, exit; ``dropped`` first when a replay misses the beginning."""
        reader: LogReader[OutputEvent] = self.log.attach(replay=replay)
        encoder = EventEncoder(encoding)
        try:
            yield {"type": "start", "pid": self.pid, "tag": self.tag, "cmd": self.command}
            while (batch := await reader.next(EVENT_BATCH)) is not None:
                if batch.resync:
                    # The buffer had already let go of earlier output (or skipped some).
                    yield {"type": "dropped"}
                for item in coalesce(batch.items):
                    event = encoder.encode(item.stream, item.data)
                    if event is not None:
                        yield event
            for event in encoder.flush():
                yield event
            await self.done.wait()
            yield self.exit_event()
        finally:
            reader.close()


@dataclass(frozen=True)
class ExecResult:
    pid: int
    exit_code: int
    signal: str | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    truncated: bool
    duration_ms: float

    def to_json(self) -> dict[str, Any]:
        return {
            "exit_code": self.exit_code,
            "stdout": self.stdout.decode("utf-8", errors="replace"),
            "stderr": self.stderr.decode("utf-8", errors="replace"),
            "signal": self.signal,
            "timed_out": self.timed_out,
            "truncated": self.truncated,
            "pid": self.pid,
            "duration_ms": round(self.duration_ms, 3),
        }


def feed_stdin(process: ManagedProcess, data: bytes) -> None:
    # A command that exits without reading its input is not an error for exec.
    try:
        process.write_stdin(data)
        process.close_stdin()
    except ApiError as exc:
        log.debug("input for process %d not delivered: %s", process.pid, exc.message)


def kill_quietly(process: ManagedProcess) -> None:
    with contextlib.suppress(ApiError):
        process.send_signal(signal.SIGKILL)


class ProcessManager:
    def __init__(
        self,
        launcher: Launcher,
        resolver: PathResolver,
        *,
        buffer_bytes: int = 1024 * 1024,
        keep_exited: int = 32,
    ) -> None:
        self.launcher = launcher
        self.resolver = resolver
        self.buffer_bytes = buffer_bytes
        self._by_pid: dict[int, ManagedProcess] = {}
        self._by_tag: dict[str, ManagedProcess] = {}
        self._exited = ExitedChildren(keep_exited, self._forget)

    def start(self, spec: CommandSpec, *, stdin: bool = False) -> ManagedProcess:
        if spec.tag is not None:
            existing = self._by_tag.get(spec.tag)
            if existing is not None and existing.alive:
                raise conflict(
                    f"tag {spec.tag!r} is in use by process {existing.pid}", "tag_in_use"
                )
        ctx = self.launcher.prepare(user=spec.user, cwd=spec.cwd, env=spec.env)
        argv = spec.argv if spec.argv is not None else self.launcher.shell_argv(spec.cmd or "")
        try:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                bufsize=0,
                **ctx.popen_kwargs(),
            )
        except FileNotFoundError:
            raise bad_request(f"command not found: {argv[0]!r}", "command_not_found") from None
        except PermissionError:
            raise bad_request(f"permission denied executing {argv[0]!r}", "spawn_failed") from None
        except OSError as exc:
            raise bad_request(f"could not start {argv[0]!r}: {exc}", "spawn_failed") from None
        process = ManagedProcess(
            popen,
            tag=spec.tag or f"proc-{popen.pid}",
            spec=spec,
            argv=argv,
            cwd=self.resolver.to_virtual(ctx.cwd),
            user=ctx.account.name,
            buffer_bytes=self.buffer_bytes,
            on_exit=self._retire,
        )
        self._by_pid[process.pid] = process
        self._by_tag[process.tag] = process
        log.info("started process %d (%s): %s", process.pid, process.tag, process.command)
        return process

    def _retire(self, process: ManagedProcess) -> None:
        log.info("process %d exited with %s", process.pid, process.exit_code)
        # Subscribers still reading keep their place; the log only stops holding the rest.
        process.log.shrink(RETAINED_AFTER_EXIT)
        self._exited.add(process)

    def _forget(self, process: ManagedProcess) -> None:
        if self._by_pid.get(process.pid) is process:
            del self._by_pid[process.pid]
        if self._by_tag.get(process.tag) is process:
            del self._by_tag[process.tag]

    def get(self, ref: str) -> ManagedProcess:
        """By pid (all digits) or by tag."""
        process = self._by_pid.get(int(ref)) if ascii_digits(ref) else self._by_tag.get(ref)
        if process is None:
            raise not_found(f"no process with pid or tag {ref!r}", "unknown_process")
        return process

    def list(self) -> list[ManagedProcess]:
        return sorted(self._by_pid.values(), key=lambda p: p.started_at)

    async def run(self, request: ExecRequest, output_limit: int) -> ExecResult:
        started = time.monotonic()
        process = self.start(request.command, stdin=request.input is not None)
        reader = process.log.attach(replay=True)
        out = bytearray()
        err = bytearray()
        truncated = False

        async def collect() -> None:
            nonlocal truncated
            while (batch := await reader.next(EVENT_BATCH)) is not None:
                truncated = truncated or batch.resync
                for item in batch.items:
                    buf = out if item.stream == "stdout" else err
                    room = output_limit - len(buf)
                    if len(item.data) > room:
                        truncated = True
                    buf += item.data[: max(0, room)]

        timed_out = False
        try:
            if request.input is not None:
                feed_stdin(process, request.input)
            try:
                async with asyncio.timeout(request.timeout):
                    await collect()
            except TimeoutError:
                timed_out = True
                kill_quietly(process)
                try:
                    async with asyncio.timeout(5):
                        await collect()
                except TimeoutError:
                    truncated = True
            await process.done.wait()
        finally:
            reader.close()
        assert process.exit_code is not None
        return ExecResult(
            pid=process.pid,
            exit_code=TIMEOUT_EXIT_CODE if timed_out else process.exit_code,
            signal=process.signal,
            stdout=bytes(out),
            stderr=bytes(err),
            timed_out=timed_out,
            truncated=truncated,
            duration_ms=(time.monotonic() - started) * 1000,
        )

    def start_streaming(
        self, request: ExecRequest, encoding: Encoding
    ) -> AsyncIterator[dict[str, Any]]:
        """Start now (so a bad request fails before any response), stream events lazily."""
        process = self.start(request.command, stdin=request.input is not None)
        if request.input is not None:
            feed_stdin(process, request.input)
        return self._stream_exec(process, request, encoding)

    async def _stream_exec(
        self, process: ManagedProcess, request: ExecRequest, encoding: Encoding
    ) -> AsyncIterator[dict[str, Any]]:
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            if process.alive:
                timed_out = True
                kill_quietly(process)

        timer = (
            asyncio.get_running_loop().call_later(request.timeout, expire)
            if request.timeout
            else None
        )
        try:
            async for event in process.events(replay=True, encoding=encoding):
                if event["type"] == "exit":
                    event["timed_out"] = timed_out
                    if timed_out:
                        event["exit_code"] = TIMEOUT_EXIT_CODE
                yield event
        finally:
            if timer is not None:
                timer.cancel()

    async def shutdown(self) -> None:
        for process in list(self._by_pid.values()):
            if process.alive:
                kill_group(process.pid)
