"""Accounts from the passwd database, and the permission check envd makes on a user's behalf.

envd runs as root in the guest, so the kernel would let it read or write anything; when a
request acts for an ordinary user, files are checked against that user's uid and groups.
In host mode everything runs as whoever started envd and ``user`` fields are ignored.
"""

from __future__ import annotations

import logging
import os
import pwd
import stat
from dataclasses import dataclass, field

from .errors import bad_request

log = logging.getLogger("envd.users")

FALLBACK_SHELL = "/bin/sh"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...] = field(default=())

    @classmethod
    def from_passwd(cls, entry: pwd.struct_passwd) -> Account:
        try:
            groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
        except OSError:
            groups = (entry.pw_gid,)
        shell = entry.pw_shell or FALLBACK_SHELL
        if not os.access(shell, os.X_OK) or shell.endswith(("/nologin", "/false")):
            shell = FALLBACK_SHELL
        return cls(
            name=entry.pw_name,
            uid=entry.pw_uid,
            gid=entry.pw_gid,
            home=entry.pw_dir or "/",
            shell=shell,
            groups=groups,
        )


def can_access(st: os.stat_result, account: Account, want: int) -> bool:
    """Classic owner/group/other check of ``want`` (an ``os.R_OK | os.W_OK | os.X_OK`` mask)."""
    mode = st.st_mode
    if account.uid == 0:
        # root needs at least one execute bit to execute a regular file, nothing else.
        if want & os.X_OK and not stat.S_ISDIR(mode):
            return bool(mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH))
        return True
    if st.st_uid == account.uid:
        bits = (mode >> 6) & 7
    elif st.st_gid == account.gid or st.st_gid in account.groups:
        bits = (mode >> 3) & 7
    else:
        bits = mode & 7
    return bits & want == want


def current_account() -> Account:
    """envd's own account. An image may have no passwd database at all (a busybox or
    distroless OCI image): then root is root by number, with / as home unless /root exists."""
    uid = os.geteuid()
    try:
        return Account.from_passwd(pwd.getpwuid(uid))
    except KeyError:
        gid = os.getegid()
        name = "root" if uid == 0 else str(uid)
        home = "/root" if uid == 0 and os.path.isdir("/root") else "/"
        log.warning("uid %d has no passwd entry; acting as %r (home %s)", uid, name, home)
        return Account(name=name, uid=uid, gid=gid, home=home, shell=FALLBACK_SHELL, groups=(gid,))


class Accounts:
    def __init__(self, host_mode: bool) -> None:
        self.host_mode = host_mode
        self.current = current_account()
        # Only root can switch user; anything else (host mode included) runs as itself.
        self.can_switch = not host_mode and os.geteuid() == 0

    def lookup(self, name: str | None, default: str | None = None) -> Account:
        wanted = name or default
        if not wanted or wanted == self.current.name:
            return self.current
        if self.host_mode:
            log.info("host mode: ignoring user %r, acting as %r", wanted, self.current.name)
            return self.current
        try:
            entry = pwd.getpwnam(wanted)
        except KeyError:
            raise bad_request(f"unknown user {wanted!r}", "unknown_user") from None
        if not self.can_switch:
            log.info("cannot run as %r without root; running as %r", wanted, self.current.name)
            return self.current
        return Account.from_passwd(entry)

    def enforce_permissions(self, account: Account) -> bool:
        """Whether envd must check permissions itself (it is root acting for someone else)."""
        return self.can_switch and account.uid != 0 and os.geteuid() == 0
