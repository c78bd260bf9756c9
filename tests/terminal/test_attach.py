"""Full-screen attach, with a pseudo-terminal standing in for the user's real terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import termios
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.terminal.conftest import SHELL, new_capsule_id
from tui.terminal.attach import AttachError, AttachResult, attach_fullscreen
from tui.terminal.sessions import session_tag


class FakeTerminal:
    """The user's side: what they type goes to ``master``, what the terminal shows comes
    back from it."""

    def __init__(self, cols: int, rows: int) -> None:
        self.master, self.slave = pty.openpty()
        self.resize(cols, rows)
        self.seen = b""

    def resize(self, cols: int, rows: int) -> None:
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def wait_for(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.seen:
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not shown; terminal got {self.seen[-500:]!r}")
            os.set_blocking(self.master, False)
            try:
                self.seen += os.read(self.master, 65536)
            except BlockingIOError:
                time.sleep(0.02)

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


@contextmanager
def attached(envd_url: str, tag: str, terminal: FakeTerminal) -> Iterator[list[AttachResult]]:
    results: list[AttachResult] = []
    thread = threading.Thread(
        target=lambda: results.append(
            attach_fullscreen(
                envd_url,
                None,
                tag,
                stdin_fd=terminal.slave,
                stdout_fd=terminal.slave,
                cmd=SHELL["cmd"],  # type: ignore[arg-type]
                args=SHELL["args"],  # type: ignore[arg-type]
                env=SHELL["env"],  # type: ignore[arg-type]
            )
        ),
        daemon=True,
    )
    thread.start()
    try:
        yield results
    finally:
        thread.join(10)
        assert not thread.is_alive(), "attach_fullscreen did not return"


def test_attach_bridges_the_terminal_follows_its_size_and_detaches_on_ctrl_bracket(
    envd_url: str,
) -> None:
    terminal = FakeTerminal(101, 33)
    tag = session_tag(new_capsule_id())
    try:
        with attached(envd_url, tag, terminal) as results:
            terminal.wait_for("ctrl+] returns")
            terminal.wait_for("wrenn$")
            terminal.type("stty size; echo sum-$((20+3))\r")
            terminal.wait_for("33 101")
            terminal.wait_for("sum-23")
            terminal.resize(90, 20)
            time.sleep(0.8)
            terminal.type("stty size\r")
            terminal.wait_for("20 90")
            terminal.type("export Z=kept\r\x1d")
        assert results == [AttachResult("detached")]
        # The session lives on and is found again by its tag.
        terminal.seen = b""
        with attached(envd_url, tag, terminal) as results:
            terminal.type("echo Z=$Z; exit 4\r")
            terminal.wait_for("Z=kept")
        assert results[0].reason == "exited" and results[0].exit_code == 4
    finally:
        terminal.close()


def test_attach_to_an_unreachable_envd_says_what_to_do() -> None:
    with pytest.raises(AttachError, match="is the capsule running"):
        attach_fullscreen("http://127.0.0.1:9", None, "tui-nowhere", stdin_fd=0, stdout_fd=1)
