"""Terminal sessions, independent of any wire protocol.

Each session is a child on its own pseudo-terminal, named by a tag. It outlives any
connection: clients attach and detach, and on attaching get the recent output (a bounded
ring) so they can redraw the screen. The master side is read on the event loop; while an
attached client lags, reading pauses and the kernel makes the child wait, so a flood of
output never piles up in envd.
"""

from __future__ import annotations

import asyncio
import fcntl
import grp
import logging
import os
import secrets
import shlex
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .buffers import LogReader, OutputLog
from .errors import ApiError, bad_request, conflict, not_found
from .fdio import BufferFull, FdReader, FdWriter, wait_exit
from .paths import PathResolver
from .spawn import ExitedChildren, Launcher, exit_status, kill_group
from .validation import Fields, check_env, check_tag

log = logging.getLogger("envd.pty")

MAX_DIMENSION = 1000
DEFAULT_COLS = 80
DEFAULT_ROWS = 24
TERM = "xterm-256color"
INPUT_LIMIT = 1024 * 1024
RETAINED_AFTER_EXIT = 64 * 1024


def check_size(cols: int | None, rows: int | None) -> tuple[int, int]:
    cols = DEFAULT_COLS if cols is None else cols
    rows = DEFAULT_ROWS if rows is None else rows
    if not (1 <= cols <= MAX_DIMENSION and 1 <= rows <= MAX_DIMENSION):
        raise bad_request(
            f"cols and rows must be between 1 and {MAX_DIMENSION} (got {cols}x{rows})",
            "invalid_size",
        )
    return cols, rows


@dataclass(frozen=True)
class PtyStartRequest:
    cmd: str | None = None
    args: list[str] | None = None
    cols: int = DEFAULT_COLS
    rows: int = DEFAULT_ROWS
    env: dict[str, str] | None = None
    cwd: str | None = None
    user: str | None = None
    tag: str | None = None

    @classmethod
    def parse(cls, body: object) -> PtyStartRequest:
        f = Fields(body, "message")
        cols, rows = check_size(f.opt_int("cols"), f.opt_int("rows"))
        cmd = f.opt_str("cmd")
        args = f.opt_str_list("args")
        if cmd is not None and not cmd:
            raise bad_request("'cmd' must not be empty")
        if args is not None and cmd is None:
            raise bad_request("'args' needs 'cmd'")
        env = f.opt_str_map("env")
        tag = f.opt_str("tag")
        return cls(
            cmd=cmd,
            args=args,
            cols=cols,
            rows=rows,
            env=check_env(env) if env is not None else None,
            cwd=f.opt_str("cwd") or None,
            user=f.opt_str("user") or None,
            tag=check_tag(tag) if tag is not None else None,
        )


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _give_terminal(slave_fd: int, uid: int) -> None:
    # As login(1) does: the user owns its terminal, so programs that open it by name
    # (/dev/pts/N: tmux, less, ssh prompts) work after envd dropped to that user.
    try:
        tty_gid = grp.getgrnam("tty").gr_gid
    except KeyError:
        tty_gid = -1
    os.fchown(slave_fd, uid, tty_gid)
    os.fchmod(slave_fd, 0o620)


def _acquire_controlling_tty() -> None:
    # Runs in the child after setsid(): make the PTY (already on fd 0) its controlling
    # terminal, so job control, Ctrl-C and SIGWINCH work.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtySession:
    def __init__(
        self,
        *,
        tag: str,
        popen: subprocess.Popen[bytes],
        master_fd: int,
        argv: list[str],
        command: str,
        cols: int,
        rows: int,
        cwd: str,
        user: str,
        ring_bytes: int,
        on_exit: Callable[[PtySession], None],
    ) -> None:
        self.tag = tag
        self.popen = popen
        self.pid = popen.pid
        self.master_fd = master_fd
        self.argv = argv
        self.command = command
        self.cols = cols
        self.rows = rows
        self.cwd = cwd
        self.user = user
        self.created_at = time.time()
        self.ended_at: float | None = None
        self.exit_code: int | None = None
        self.signal: str | None = None
        # Reading pauses well before the ring is full, so an attached client never loses
        # output to the ring's own trimming.
        self.log: OutputLog[bytes] = OutputLog(
            ring_bytes, high_water=ring_bytes * 3 // 8, low_water=ring_bytes // 8
        )
        self.done = asyncio.Event()
        self._on_exit = on_exit
        self._reader = FdReader(master_fd, self._sink, self.log)
        self._writer = FdWriter(master_fd, limit=INPUT_LIMIT, owns_fd=False)
        self._task = asyncio.create_task(self._supervise(), name=f"pty-{tag}")

    def _sink(self, data: bytes) -> None:
        self.log.append(data, len(data))

    @property
    def alive(self) -> bool:
        return self.exit_code is None

    def info(self) -> dict[str, Any]:
        return {
            "tag": self.tag,
            "pid": self.pid,
            "cmd": self.command,
            "cols": self.cols,
            "rows": self.rows,
            "cwd": self.cwd,
            "user": self.user,
            "alive": self.alive,
            "exit_code": self.exit_code,
            "signal": self.signal,
            "attached": self.log.reader_count,
            "created_at": self.created_at,
        }

    async def _supervise(self) -> None:
        self._reader.start()
        try:
            returncode = await wait_exit(self.pid)
        except asyncio.CancelledError:
            self._close()
            raise
        self.popen.returncode = returncode
        self._reader.drain()
        self._close()
        self.exit_code, self.signal = exit_status(returncode)
        self.ended_at = time.time()
        self.log.close()
        self.done.set()
        self._on_exit(self)

    def _close(self) -> None:
        self._reader.finish()
        self._writer.abort()
        # Closing the master hangs up any background job still holding the terminal.
        os.close(self.master_fd)

    def attach(self, replay: bool = True) -> LogReader[bytes]:
        return self.log.attach(replay=replay)

    def write(self, data: bytes) -> None:
        if not self.alive:
            raise conflict(f"session {self.tag!r} has exited", "not_running")
        try:
            self._writer.write(data)
        except BufferFull as exc:
            raise ApiError(429, "input_full", str(exc)) from None
        except BrokenPipeError:
            raise conflict(f"session {self.tag!r} is not accepting input", "not_running") from None

    def resize(self, cols: int | None, rows: int | None) -> None:
        cols, rows = check_size(cols, rows)
        if not self.alive:
            raise conflict(f"session {self.tag!r} has exited", "not_running")
        _set_winsize(self.master_fd, cols, rows)
        self.cols, self.rows = cols, rows

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if not self.alive:
            raise conflict(f"session {self.tag!r} has exited", "not_running")
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                raise conflict(f"session {self.tag!r} has exited", "not_running") from None


class PtyManager:
    def __init__(
        self,
        launcher: Launcher,
        resolver: PathResolver,
        *,
        ring_bytes: int = 256 * 1024,
        keep_exited: int = 32,
    ) -> None:
        self.launcher = launcher
        self.resolver = resolver
        self.ring_bytes = ring_bytes
        self._sessions: dict[str, PtySession] = {}
        self._exited = ExitedChildren(keep_exited, self._forget)

    def start(self, request: PtyStartRequest) -> PtySession:
        tag = request.tag or f"pty-{secrets.token_hex(4)}"
        existing = self._sessions.get(tag)
        if existing is not None and existing.alive:
            raise conflict(f"session {tag!r} already exists", "tag_in_use")
        ctx = self.launcher.prepare(user=request.user, cwd=request.cwd, env=request.env, term=TERM)
        if request.cmd is None:
            # A leading dash in argv[0] is how login(1) asks any shell to act as a login shell.
            executable = ctx.account.shell
            argv = ["-" + os.path.basename(executable)]
            command = executable
        else:
            executable = None
            argv = [request.cmd, *(request.args or [])]
            command = shlex.join(argv)
        master, slave = os.openpty()
        try:
            _set_winsize(master, request.cols, request.rows)
            if ctx.switch_user:
                _give_terminal(slave, ctx.account.uid)
            popen = subprocess.Popen(
                argv,
                executable=executable,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                bufsize=0,
                **ctx.popen_kwargs(preexec=_acquire_controlling_tty),
            )
        except OSError as exc:
            os.close(master)
            name = executable or argv[0]
            code = "command_not_found" if isinstance(exc, FileNotFoundError) else "spawn_failed"
            raise bad_request(f"could not start {name!r}: {exc.strerror or exc}", code) from None
        finally:
            os.close(slave)
        session = PtySession(
            tag=tag,
            popen=popen,
            master_fd=master,
            argv=argv,
            command=command,
            cols=request.cols,
            rows=request.rows,
            cwd=self.resolver.to_virtual(ctx.cwd),
            user=ctx.account.name,
            ring_bytes=self.ring_bytes,
            on_exit=self._retire,
        )
        if existing is not None:
            self._forget(existing)
        self._sessions[tag] = session
        log.info("started pty session %s (pid %d): %s", tag, session.pid, command)
        return session

    def _forget(self, session: PtySession) -> None:
        if self._sessions.get(session.tag) is session:
            del self._sessions[session.tag]
        self._exited.discard(session)

    def _retire(self, session: PtySession) -> None:
        log.info("pty session %s exited with %s", session.tag, session.exit_code)
        # Enough of a dead session's output to show how it ended.
        session.log.shrink(RETAINED_AFTER_EXIT)
        self._exited.add(session)

    def get(self, tag: str) -> PtySession:
        session = self._sessions.get(tag)
        if session is None:
            raise not_found(f"no terminal session with tag {tag!r}", "unknown_session")
        return session

    def list(self) -> list[PtySession]:
        return sorted(self._sessions.values(), key=lambda s: s.created_at)

    async def shutdown(self) -> None:
        for session in list(self._sessions.values()):
            if session.alive:
                kill_group(session.pid)
