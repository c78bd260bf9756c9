"""Everything a child process needs from envd: user, working directory, environment, argv."""

from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import bad_request
from .paths import PathResolver
from .state import RuntimeState
from .users import Account, Accounts

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class LaunchContext:
    account: Account
    cwd: Path
    env: dict[str, str]
    switch_user: bool

    def popen_kwargs(self, preexec: Callable[[], None] | None = None) -> dict[str, Any]:
        """subprocess.Popen arguments; `preexec` runs in the child after its signal state
        is cleaned (see clean_signal_state)."""
        kwargs: dict[str, Any] = {
            "env": self.env,
            "cwd": str(self.cwd),
            # Own session and process group: signals reach the whole job, and a child never
            # gets envd's terminal or its Ctrl-C.
            "start_new_session": True,
            "close_fds": True,
        }
        reset = clean_signal_state()
        if reset is not None and preexec is not None:
            kwargs["preexec_fn"] = _chain(reset, preexec)
        elif reset is not None or preexec is not None:
            kwargs["preexec_fn"] = reset or preexec
        if self.switch_user:
            kwargs["user"] = self.account.uid
            kwargs["group"] = self.account.gid
            kwargs["extra_groups"] = list(self.account.groups)
        return kwargs


_UNCATCHABLE = {signal.SIGKILL, signal.SIGSTOP}


def clean_signal_state() -> Callable[[], None] | None:
    """What a child needs to start with default signal handling, or None when it already
    will. exec resets the signals envd handles, but not the ones it ignores or blocks: under
    `nohup` (or any launcher that ignores SIGHUP) every shell and command would inherit an
    ignored SIGHUP, and a hangup could not end them."""
    ignored = [
        sig
        for sig in signal.valid_signals()
        if sig not in _UNCATCHABLE and signal.getsignal(sig) is signal.SIG_IGN
    ]
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if not ignored and not blocked:
        return None

    def reset() -> None:  # runs in the child between fork and exec
        for sig in ignored:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])

    return reset


def _chain(first: Callable[[], None], then: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        first()
        then()

    return both


C = TypeVar("C")


class ExitedChildren(Generic[C]):
    """The last `keep` children that exited, so their status and output stay readable for a
    while; the oldest is handed to `forget` as each newer one exits."""

    def __init__(self, keep: int, forget: Callable[[C], None]) -> None:
        self.keep = keep
        self._forget = forget
        self._children: deque[C] = deque()

    def add(self, child: C) -> None:
        self._children.append(child)
        while len(self._children) > self.keep:
            self._forget(self._children.popleft())

    def discard(self, child: C) -> None:
        with contextlib.suppress(ValueError):
            self._children.remove(child)


def kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (envd's children each lead their own)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def exit_status(returncode: int) -> tuple[int, str | None]:
    """Shell-style exit code (128 + n when killed by signal n) and the signal's name."""
    if returncode < 0:
        try:
            name: str | None = signal.Signals(-returncode).name
        except ValueError:
            name = None
        return 128 - returncode, name
    return returncode, None


class Launcher:
    def __init__(self, state: RuntimeState, accounts: Accounts, resolver: PathResolver) -> None:
        self.state = state
        self.accounts = accounts
        self.resolver = resolver
        self.shell = "/bin/bash" if os.access("/bin/bash", os.X_OK) else "/bin/sh"

    def shell_argv(self, command: str) -> list[str]:
        if self.shell.endswith("bash"):
            return [self.shell, "-l", "-c", command]
        return [self.shell, "-c", command]

    def prepare(
        self,
        *,
        user: str | None,
        cwd: str | None,
        env: dict[str, str] | None,
        term: str | None = None,
    ) -> LaunchContext:
        account = self.accounts.lookup(user, self.state.default_user)
        # In host mode the home lives under the root too, so that ~ and the files API agree.
        home = self.resolver.to_real(account.home, account.home)
        wanted = cwd or self.state.default_workdir
        if wanted:
            real_cwd = self.resolver.to_real(wanted, account.home)
            if not real_cwd.is_dir():
                raise bad_request(f"working directory {wanted!r} does not exist", "invalid_cwd")
        elif home.is_dir():
            real_cwd = home
        else:
            # A user without a home still gets a shell, as login(1) would give one in /.
            real_cwd = self.resolver.to_real("/", "/")
        base = {
            "PATH": os.environ.get("PATH") or DEFAULT_PATH,
            "LANG": os.environ.get("LANG") or "C.UTF-8",
            "HOME": str(home),
            "USER": account.name,
            "LOGNAME": account.name,
            "SHELL": account.shell,
        }
        if term:
            base["TERM"] = term
        base.update(self.state.sandbox_env())
        if env:
            base.update(env)
        return LaunchContext(
            account=account,
            cwd=real_cwd,
            env=base,
            switch_user=self.accounts.can_switch and account.uid != os.geteuid(),
        )
