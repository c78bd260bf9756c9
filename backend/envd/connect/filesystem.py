"""``filesystem.Filesystem``: stat, list, mkdir, move, remove and directory watches.

Paths go through envd's PathResolver, so host mode (``--root``) confines them exactly as the
HTTP files API does; relative paths start at the acting user's home. While envd is root
acting for another user, that user's permissions are checked and what it creates is its own.
A symlink is described by its target's type with ``isSymlink`` set, as E2B's envd does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import re
import secrets
import shutil
import stat
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from pathlib import Path
from typing import TypeVar

from ..files import NotADirectory, make_dirs, may_create_in, missing_dirs, read_metadata
from ..paths import PathResolver
from ..state import RuntimeState
from ..users import Account, Accounts, can_access
from .watcher import (
    CHMOD,
    CREATE,
    EVENT_TYPES,
    REMOVE,
    RENAME,
    WRITE,
    DirectoryWatch,
    FsEvent,
    WatchUnavailable,
)
from .wire import Call, Json, Msg, Rpc, RpcError, ServerStreamRpc, UnaryRpc, invalid, timestamp

# envd's uploads write `.NAME.upload-XXXXXXXX` (mkstemp) and rename it over NAME: a client
# watching the directory wants to see NAME written, not envd's scaffolding. The rename is
# reported as E2B's envd (open O_CREAT|O_TRUNC, chown, write) reports an upload: CREATE,
# CHMOD, WRITE of NAME.
UPLOAD_TEMP = re.compile(r"^\.(.+)\.upload-[a-z0-9_]{8}$")
UPLOAD_EVENTS = (CREATE, CHMOD, WRITE)
MAX_PENDING_UPLOADS = 1024
MAX_WATCHERS = 256
MAX_PENDING_EVENTS = 10_000

T = TypeVar("T")


def os_error(exc: OSError, shown: str) -> RpcError:
    if isinstance(exc, FileNotFoundError):
        return RpcError("not_found", f"path {shown!r} does not exist")
    if isinstance(exc, PermissionError) or exc.errno == errno.EROFS:
        return RpcError("permission_denied", f"permission denied for {shown!r}: {exc.strerror}")
    if isinstance(exc, NotADirectoryError):
        return invalid(f"a parent of {shown!r} is not a directory")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return RpcError("resource_exhausted", f"no space left on device for {shown!r}")
    return RpcError("internal", f"{shown!r}: {exc.strerror or exc}")


def _name_of(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_of(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class FilesystemService:
    def __init__(self, resolver: PathResolver, accounts: Accounts, state: RuntimeState) -> None:
        self.resolver = resolver
        self.accounts = accounts
        self.state = state
        self._watchers: dict[str, _PolledWatcher] = {}

    def rpcs(self) -> dict[str, Rpc]:
        return {
            "Stat": UnaryRpc(self.stat),
            "MakeDir": UnaryRpc(self.make_dir),
            "Move": UnaryRpc(self.move),
            "ListDir": UnaryRpc(self.list_dir),
            "Remove": UnaryRpc(self.remove),
            "WatchDir": ServerStreamRpc(self.watch_dir, keepalive={"keepalive": {}}),
            "CreateWatcher": UnaryRpc(self.create_watcher),
            "GetWatcherEvents": UnaryRpc(self.get_watcher_events),
            "RemoveWatcher": UnaryRpc(self.remove_watcher),
        }

    # -- paths ------------------------------------------------------------------------------

    def account(self, call: Call) -> Account:
        return self.accounts.lookup(call.user, self.state.default_user)

    def locate(self, path: str, account: Account) -> tuple[str, Path]:
        """The API path and the real path, the last component left unresolved (lstat-able)."""
        virtual = self.resolver.virtual(path, account.home)
        if virtual == "/":
            return virtual, self.resolver.real_of_virtual("/", path)
        parent, _, name = virtual.rpartition("/")
        return virtual, self.resolver.real_of_virtual(parent or "/", path) / name

    def _require(self, account: Account, real: Path, want: int, shown: str) -> None:
        if not self.accounts.enforce_permissions(account):
            return
        try:
            st = real.stat()
        except OSError:
            return
        if not can_access(st, account, want):
            raise RpcError("permission_denied", f"{account.name} may not access {shown!r}")

    def entry(self, virtual: str, real: Path) -> Json:
        st = os.lstat(real)
        info: Json = {"name": virtual.rpartition("/")[2] or "/", "path": virtual}
        shown = st
        if stat.S_ISLNK(st.st_mode):
            info["isSymlink"] = True
            target = Path(os.path.realpath(real))
            if not self.resolver.contains(target):
                # Host mode, a link out of the root: what is there is none of the API's
                # business (not its path, size or owner); the link is shown as itself.
                info["type"] = "FILE_TYPE_SYMLINK"
                info["symlinkTarget"] = ""
            else:
                info["symlinkTarget"] = self.resolver.to_virtual(target)
                try:
                    shown = os.stat(real)
                except OSError:
                    info["type"] = "FILE_TYPE_SYMLINK"
        if "type" not in info:
            if stat.S_ISDIR(shown.st_mode):
                info["type"] = "FILE_TYPE_DIRECTORY"
            elif stat.S_ISREG(shown.st_mode):
                info["type"] = "FILE_TYPE_FILE"
            else:
                info["type"] = "FILE_TYPE_UNSPECIFIED"
        info.update(
            size=str(shown.st_size),
            mode=stat.S_IMODE(shown.st_mode),
            permissions=stat.filemode(shown.st_mode),
            owner=_name_of(shown.st_uid),
            group=_group_of(shown.st_gid),
            modifiedTime=timestamp(shown.st_mtime_ns),
        )
        metadata = read_metadata(real)
        if metadata:
            info["metadata"] = metadata
        return info

    async def _run(self, fn: Callable[[], T], shown: str) -> T:
        try:
            return await asyncio.to_thread(fn)
        except OSError as exc:
            raise os_error(exc, shown) from None

    def _make_dirs(self, real: Path, account: Account, shown: str) -> bool:
        """Create ``real`` and missing parents; False when it already was a directory."""
        try:
            base, missing = missing_dirs(real)
        except NotADirectory as exc:
            if exc.path == real:
                raise invalid(f"{shown!r} exists and is not a directory") from None
            raise invalid(f"a parent of {shown!r} is not a directory") from None
        if not missing:
            return False
        if not may_create_in(base, account, self.accounts):
            raise RpcError("permission_denied", f"{account.name} may not create {shown!r}")
        list(make_dirs(missing, account, self.accounts))
        return True

    # -- unary ------------------------------------------------------------------------------

    async def stat(self, request: Msg, call: Call) -> Json:
        account = self.account(call)
        virtual, real = self.locate(request.text("path"), account)
        return {"entry": await self._run(lambda: self.entry(virtual, real), virtual)}

    async def make_dir(self, request: Msg, call: Call) -> Json:
        account = self.account(call)
        virtual, real = self.locate(request.text("path"), account)

        def make() -> Json:
            if not self._make_dirs(real, account, virtual):
                raise RpcError("already_exists", f"directory {virtual!r} already exists")
            return self.entry(virtual, real)

        return {"entry": await self._run(make, virtual)}

    async def move(self, request: Msg, call: Call) -> Json:
        account = self.account(call)
        source, real_source = self.locate(request.text("source"), account)
        destination, real_destination = self.locate(request.text("destination"), account)

        def move() -> Json:
            os.lstat(real_source)
            self._require(account, real_source.parent, os.W_OK | os.X_OK, source)
            self._make_dirs(real_destination.parent, account, destination)
            self._require(account, real_destination.parent, os.W_OK | os.X_OK, destination)
            try:
                os.rename(real_source, real_destination)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                shutil.move(real_source, real_destination)
            return self.entry(destination, real_destination)

        return {"entry": await self._run(move, source)}

    async def list_dir(self, request: Msg, call: Call) -> Json:
        account = self.account(call)
        path = request.text("path")
        depth = max(1, request.uint("depth"))
        virtual = self.resolver.virtual(path, account.home)
        top = self.resolver.to_real(path, account.home)

        def walk() -> list[Json]:
            if not top.is_dir():
                os.stat(top)
                raise invalid(f"{virtual!r} is not a directory")
            self._require(account, top, os.R_OK | os.X_OK, virtual)
            # Depth first, each directory's entries by name (Go's filepath.WalkDir, as E2B's
            # envd lists): a directory is followed by what is in it.
            entries: list[Json] = []
            stack: list[tuple[Iterator[os.DirEntry[str]], str, int]] = [
                (iter(sorted(os.scandir(top), key=lambda e: e.name)), virtual, 1)
            ]
            while stack:
                children, virtual_dir, level = stack[-1]
                child = next(children, None)
                if child is None:
                    stack.pop()
                    continue
                child_virtual = f"{virtual_dir.rstrip('/')}/{child.name}"
                try:
                    entries.append(self.entry(child_virtual, Path(child.path)))
                except FileNotFoundError:
                    continue
                if level < depth and child.is_dir(follow_symlinks=False):
                    try:
                        below = sorted(os.scandir(child.path), key=lambda e: e.name)
                    except OSError:
                        continue
                    stack.append((iter(below), child_virtual, level + 1))
            return entries

        return {"entries": await self._run(walk, virtual)}

    async def remove(self, request: Msg, call: Call) -> Json:
        account = self.account(call)
        virtual, real = self.locate(request.text("path"), account)
        if real == self.resolver.real_of_virtual("/"):
            raise invalid("refusing to remove the root directory")

        def remove() -> None:
            try:
                st = os.lstat(real)
            except FileNotFoundError:
                return  # as E2B's envd (os.RemoveAll): nothing there is not an error
            self._require(account, real.parent, os.W_OK | os.X_OK, virtual)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(real)
            else:
                real.unlink()

        await self._run(remove, virtual)
        return {}

    # -- watches ----------------------------------------------------------------------------

    def _watch(
        self,
        request: Msg,
        call: Call,
        sink: Callable[[Json], None],
        on_end: Callable[[], None],
    ) -> DirectoryWatch:
        account = self.account(call)
        virtual = self.resolver.virtual(request.text("path"), account.home)
        root = self.resolver.to_real(request.text("path"), account.home)
        if not root.exists():
            raise RpcError("not_found", f"path {virtual!r} does not exist")
        if not root.is_dir():
            raise invalid(f"{virtual!r} is not a directory")
        self._require(account, root, os.R_OK | os.X_OK, virtual)
        include_entry = bool(request.opt_bool("include_entry"))

        uploaded: set[str] = set()
        """Names whose upload temp was just renamed away (onto them, by envd's upload)."""

        def on_event(event: FsEvent) -> None:
            parent, _, leaf = event.name.rpartition("/")
            temp = UPLOAD_TEMP.match(leaf)
            if temp is not None:
                if event.kind == RENAME:
                    if len(uploaded) >= MAX_PENDING_UPLOADS:
                        uploaded.clear()
                    uploaded.add(f"{parent}/{temp[1]}" if parent else temp[1])
                return
            kinds: tuple[int, ...] = (event.kind,)
            if event.kind == CREATE and event.name in uploaded:
                uploaded.discard(event.name)
                kinds = UPLOAD_EVENTS
            entry: Json | None = None
            if include_entry and event.kind not in (REMOVE, RENAME):
                child = f"{virtual.rstrip('/')}/{event.name}"
                with contextlib.suppress(OSError):
                    entry = self.entry(child, event.real)
            for kind in kinds:
                message: Json = {"name": event.name, "type": EVENT_TYPES[kind]}
                if entry is not None:
                    message["entry"] = entry
                sink(message)

        try:
            return DirectoryWatch(root, bool(request.opt_bool("recursive")), on_event, on_end)
        except WatchUnavailable as exc:
            raise RpcError("unimplemented", str(exc)) from None
        except OSError as exc:
            raise os_error(exc, virtual) from None

    async def watch_dir(self, request: Msg, call: Call) -> AsyncGenerator[Json, None]:
        queue: asyncio.Queue[Json | None] = asyncio.Queue()

        def sink(message: Json) -> None:
            if queue.qsize() < MAX_PENDING_EVENTS:
                queue.put_nowait({"filesystem": message})

        watch = self._watch(request, call, sink, lambda: queue.put_nowait(None))
        try:
            yield {"start": {}}
            while (item := await queue.get()) is not None:
                yield item
        finally:
            watch.close()

    async def create_watcher(self, request: Msg, call: Call) -> Json:
        if len(self._watchers) >= MAX_WATCHERS:
            raise RpcError("resource_exhausted", f"at most {MAX_WATCHERS} watchers at once")
        watcher = _PolledWatcher()
        watcher.watch = self._watch(request, call, watcher.add, watcher.end)
        watcher_id = secrets.token_hex(8)
        self._watchers[watcher_id] = watcher
        return {"watcherId": watcher_id}

    def _watcher(self, request: Msg) -> tuple[str, _PolledWatcher]:
        watcher_id = request.text("watcher_id")
        watcher = self._watchers.get(watcher_id)
        if watcher is None:
            raise RpcError("not_found", f"watcher {watcher_id!r} not found")
        return watcher_id, watcher

    async def get_watcher_events(self, request: Msg, call: Call) -> Json:
        _, watcher = self._watcher(request)
        events = list(watcher.events)
        watcher.events.clear()
        return {"events": events}

    async def remove_watcher(self, request: Msg, call: Call) -> Json:
        watcher_id, watcher = self._watcher(request)
        del self._watchers[watcher_id]
        if watcher.watch is not None:
            watcher.watch.close()
        return {}


class _PolledWatcher:
    """Events kept for GetWatcherEvents; the oldest go first when nobody asks for them."""

    def __init__(self) -> None:
        self.events: deque[Json] = deque(maxlen=MAX_PENDING_EVENTS)
        self.watch: DirectoryWatch | None = None

    def add(self, message: Json) -> None:
        self.events.append(message)

    def end(self) -> None:
        if self.watch is not None:
            self.watch.close()
