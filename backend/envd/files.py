"""Download and upload of files, independent of the web framework.

Uploads never leave a partial file behind: each file is written to a hidden temporary file
in its target directory, fsynced, and renamed over the target only after the whole request
body (every part of it) has arrived. Anything else (a cut-off body, a full disk, a bad
part) removes the temporary files and the directories the upload itself created.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import logging
import os
import re
import stat
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ApiError, bad_request, forbidden, not_found
from .paths import PathResolver
from .users import Account, Accounts, can_access

log = logging.getLogger("envd.files")

READ_CHUNK = 256 * 1024
MAX_UNSIZED_READ = 16 << 20
"""What is read of a file whose size reads as 0 (a /proc or /sys file) before stopping."""
NEW_FILE_MODE = 0o644
NEW_DIR_MODE = 0o755


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


UMASK = _umask()


def storage_error(exc: OSError, what: str) -> ApiError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return ApiError(
            507, "insufficient_storage", f"no space left on device while writing {what}"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return forbidden(f"permission denied writing {what}: {exc.strerror}", "permission_denied")
    return ApiError(500, "write_failed", f"writing {what} failed: {exc.strerror or exc}")


# -- file metadata: `user.e2b.*` extended attributes (E2B's envd 0.6.2) --------------------------

METADATA_HEADER = "x-metadata-"
METADATA_XATTR = "user.e2b."
METADATA_KEY = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")
"""An HTTP header token (RFC 9110), lowercased: what an `X-Metadata-<key>` header can carry."""
METADATA_VALUE = re.compile(r"[\x20-\x7e]*")
MAX_METADATA_BYTES = 3072
"""Keys and values together: what fits beside the inode in ext4's one xattr block."""


def parse_metadata(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Metadata from `X-Metadata-<key>: <value>` request headers (keys lowercased), or a 400."""
    metadata: dict[str, str] = {}
    for name, value in headers:
        lowered = name.lower()
        if not lowered.startswith(METADATA_HEADER):
            continue
        key = lowered[len(METADATA_HEADER) :]
        if not METADATA_KEY.fullmatch(key):
            raise bad_request(
                f"invalid metadata key {key!r}: use an HTTP header token", "invalid_metadata"
            )
        if not METADATA_VALUE.fullmatch(value):
            raise bad_request(
                f"invalid metadata value for {key!r}: use printable US-ASCII", "invalid_metadata"
            )
        metadata[key] = value
    if sum(len(METADATA_XATTR) + len(k) + len(v) for k, v in metadata.items()) > MAX_METADATA_BYTES:
        raise bad_request(
            f"file metadata is larger than {MAX_METADATA_BYTES} bytes", "invalid_metadata"
        )
    return metadata


def read_metadata(real: Path | int) -> dict[str, str] | None:
    """A file's `user.e2b.*` attributes (prefix stripped), None when it has none."""
    try:
        names = [n for n in os.listxattr(real) if n.startswith(METADATA_XATTR)]
        found = {
            n[len(METADATA_XATTR) :]: os.getxattr(real, n).decode("ascii", errors="replace")
            for n in names
        }
    except OSError:
        return None
    return found or None


class NotADirectory(Exception):
    """The nearest existing path on the way to a directory to create is not a directory."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path


def missing_dirs(path: Path) -> tuple[Path, list[Path]]:
    """The nearest existing ancestor of `path` (or `path` itself) and the directories to
    create below it, outermost first. Raises NotADirectory when that ancestor is not a
    directory; NotADirectoryError (from stat) when a file stands higher up."""
    missing: list[Path] = []
    probe = path
    while True:
        try:
            st = probe.stat()
        except FileNotFoundError:
            missing.append(probe)
            probe = probe.parent
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectory(probe)
        missing.reverse()
        return probe, missing


def may_create_in(base: Path, account: Account, accounts: Accounts) -> bool:
    return not accounts.enforce_permissions(account) or can_access(
        base.stat(), account, os.W_OK | os.X_OK
    )


def make_dirs(dirs: list[Path], account: Account, accounts: Accounts) -> Iterator[Path]:
    """mkdir each of `dirs` (outermost first), owned by `account` when envd can switch users;
    yields each one this call created (one made meanwhile by someone else is skipped)."""
    chown = accounts.can_switch and account.uid != os.geteuid()
    for directory in dirs:
        try:
            directory.mkdir(mode=NEW_DIR_MODE)
        except FileExistsError:
            continue
        if chown:
            os.chown(directory, account.uid, account.gid)
        yield directory


@dataclass
class Download:
    # A file object rather than a bare fd: should the response never be sent (the client
    # left first), collecting it still closes the descriptor.
    file: io.FileIO
    size: int
    name: str
    path: str


@dataclass
class _PendingFile:
    virtual: str
    target: Path
    tmp: Path
    fd: int
    existing_mode: int | None
    written: int = 0


@dataclass
class _Upload:
    files: list[_PendingFile] = field(default_factory=list)
    created_dirs: list[Path] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    """Set on every file of the upload (a replaced file's old metadata goes with it)."""


class FileService:
    def __init__(self, resolver: PathResolver, accounts: Accounts) -> None:
        self.resolver = resolver
        self.accounts = accounts

    def _check(self, account: Account, real: Path, want: int, shown: str) -> None:
        """Walk the path as ``account`` would; only needed while envd acts as root for others."""
        if not self.accounts.enforce_permissions(account):
            return
        for parent in reversed(real.parents):
            try:
                st = parent.stat()
            except OSError:
                return
            if not can_access(st, account, os.X_OK):
                raise forbidden(f"{account.name} may not enter {parent}", "permission_denied")
        try:
            st = real.stat()
        except OSError:
            return
        if not can_access(st, account, want):
            raise forbidden(f"{account.name} may not access {shown!r}", "permission_denied")

    # -- download ---------------------------------------------------------------------------

    def open_download(self, path: str, account: Account) -> Download:
        real = self.resolver.to_real(path, account.home)
        virtual = self.resolver.to_virtual(real)
        try:
            st = real.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise not_found(f"file {path!r} does not exist", "file_not_found") from None
        except PermissionError:
            raise forbidden(f"permission denied for {path!r}", "permission_denied") from None
        if stat.S_ISDIR(st.st_mode):
            raise bad_request(f"{path!r} is a directory", "is_a_directory")
        if not stat.S_ISREG(st.st_mode):
            raise bad_request(f"{path!r} is not a regular file", "not_a_regular_file")
        self._check(account, real, os.R_OK, path)
        try:
            # O_NONBLOCK: a FIFO swapped in after the check must not hang the loop on open.
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            raise forbidden(f"permission denied reading {path!r}", "permission_denied") from None
        except FileNotFoundError:
            raise not_found(f"file {path!r} does not exist", "file_not_found") from None
        except OSError as exc:
            raise ApiError(500, "read_failed", f"opening {path!r} failed: {exc.strerror}") from None
        os.set_blocking(fd, True)
        file = io.FileIO(fd, "rb")
        return Download(file=file, size=os.fstat(fd).st_size, name=real.name, path=virtual)

    async def stream(self, download: Download) -> AsyncIterator[bytes]:
        # A size of 0 is also what /proc and /sys files report: those are read to their end
        # (they are small; capped all the same).
        remaining = download.size or MAX_UNSIZED_READ
        try:
            while remaining > 0:
                data = await asyncio.to_thread(download.file.read, min(READ_CHUNK, remaining))
                if not data:
                    break
                remaining -= len(data)
                yield data
        finally:
            download.file.close()

    # -- upload -----------------------------------------------------------------------------

    async def upload_multipart(
        self,
        chunks: AsyncIterator[bytes],
        content_type: str,
        path: str | None,
        account: Account,
        metadata: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        from python_multipart.exceptions import FormParserError
        from python_multipart.multipart import MultipartParser, parse_options_header

        _, params = parse_options_header(content_type)
        boundary = params.get(b"boundary")
        if not boundary:
            raise bad_request("multipart body without a boundary", "invalid_multipart")

        # The parser's callbacks are synchronous; they only record, the IO happens between feeds.
        events: list[tuple[str, Any]] = []
        header_name = bytearray()
        header_value = bytearray()
        headers: dict[bytes, bytes] = {}

        def on_part_begin() -> None:
            headers.clear()

        def on_header_field(data: bytes, start: int, end: int) -> None:
            header_name.extend(data[start:end])

        def on_header_value(data: bytes, start: int, end: int) -> None:
            header_value.extend(data[start:end])

        def on_header_end() -> None:
            headers[bytes(header_name).lower()] = bytes(header_value)
            header_name.clear()
            header_value.clear()

        def on_headers_finished() -> None:
            events.append(("part", dict(headers)))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            events.append(("data", data[start:end]))

        def on_part_end() -> None:
            events.append(("end", None))

        def on_end() -> None:
            events.append(("done", None))

        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": on_part_begin,
                "on_header_field": on_header_field,
                "on_header_value": on_header_value,
                "on_header_end": on_header_end,
                "on_headers_finished": on_headers_finished,
                "on_part_data": on_part_data,
                "on_part_end": on_part_end,
                "on_end": on_end,
            },
        )
        upload = _Upload(metadata=metadata or {})
        # Parts that are not files named "file" are read past without a target.
        current: _PendingFile | None = None
        data: list[bytes] = []
        complete = False
        try:
            async for chunk in chunks:
                try:
                    parser.write(chunk)
                except FormParserError as exc:
                    raise bad_request(
                        f"malformed multipart body: {exc}", "invalid_multipart"
                    ) from None
                for kind, value in events:
                    if kind == "data":
                        if current is not None:
                            data.append(value)
                        continue
                    if current is not None and data:
                        await self._write(current, b"".join(data))
                    data.clear()
                    current = None
                    if kind == "part":
                        _disposition, options = parse_options_header(
                            value.get(b"content-disposition")
                        )
                        if options.get(b"name") == b"file" and b"filename" in options:
                            filename = options[b"filename"].decode("utf-8", errors="replace")
                            current = self._begin_file(upload, filename, path, account)
                    elif kind == "done":
                        complete = True
                events.clear()
                # One write per network chunk rather than one per parser callback.
                if current is not None and data:
                    await self._write(current, b"".join(data))
                data.clear()
            if not complete:
                raise bad_request(
                    "the upload ended before the multipart body was complete", "incomplete_upload"
                )
            if not upload.files:
                raise bad_request("no file part named 'file' in the upload", "no_files")
            return await self._commit(upload, account)
        except BaseException:
            self._rollback(upload)
            raise

    async def upload_raw(
        self,
        chunks: AsyncIterator[bytes],
        path: str | None,
        account: Account,
        metadata: dict[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        if not path:
            raise bad_request("a raw (non-multipart) upload needs ?path=", "invalid_path")
        upload = _Upload(metadata=metadata or {})
        try:
            pending = self._begin_file(upload, None, path, account)
            async for chunk in chunks:
                await self._write(pending, chunk)
            return await self._commit(upload, account)
        except BaseException:
            self._rollback(upload)
            raise

    def _target(
        self, upload: _Upload, filename: str | None, path: str | None, account: Account
    ) -> tuple[str, Path]:
        if filename is not None and not filename.strip("/ "):
            raise bad_request("uploaded file has an empty filename", "invalid_path")
        if path:
            virtual = self.resolver.virtual(path, account.home)
            real = self.resolver.real_of_virtual(virtual, path)
            if filename is not None and (path.endswith("/") or real.is_dir()):
                virtual = self.resolver.virtual(filename.lstrip("/"), virtual)
            elif upload.files:
                raise bad_request(
                    f"several files uploaded but {path!r} is not a directory", "invalid_path"
                )
        else:
            assert filename is not None
            virtual = self.resolver.virtual(filename, account.home)
        real = self.resolver.real_of_virtual(virtual, path or filename)
        if any(f.target == real for f in upload.files):
            raise bad_request(f"{virtual!r} appears twice in one upload", "invalid_path")
        return virtual, real

    def _begin_file(
        self, upload: _Upload, filename: str | None, path: str | None, account: Account
    ) -> _PendingFile:
        virtual, target = self._target(upload, filename, path, account)
        existing_mode: int | None = None
        try:
            st = target.stat()
        except FileNotFoundError:
            pass
        except NotADirectoryError:
            raise bad_request(
                f"a parent of {virtual!r} is not a directory", "not_a_directory"
            ) from None
        else:
            if stat.S_ISDIR(st.st_mode):
                raise bad_request(f"{virtual!r} is a directory", "is_a_directory")
            if not stat.S_ISREG(st.st_mode):
                raise bad_request(f"{virtual!r} is not a regular file", "not_a_regular_file")
            existing_mode = stat.S_IMODE(st.st_mode)
        self._make_parents(upload, target.parent, account, virtual)
        self._check(account, target.parent, os.W_OK | os.X_OK, virtual)
        if existing_mode is not None:
            self._check(account, target, os.W_OK, virtual)
        try:
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.upload-")
        except OSError as exc:
            raise storage_error(exc, virtual) from None
        pending = _PendingFile(virtual, target, Path(tmp), fd, existing_mode)
        upload.files.append(pending)
        return pending

    def _make_parents(self, upload: _Upload, directory: Path, account: Account, shown: str) -> None:
        try:
            base, missing = missing_dirs(directory)
        except (NotADirectory, NotADirectoryError):
            raise bad_request(
                f"a parent of {shown!r} is not a directory", "not_a_directory"
            ) from None
        if missing and not may_create_in(base, account, self.accounts):
            raise forbidden(f"{account.name} may not create {shown!r}", "permission_denied")
        try:
            upload.created_dirs.extend(make_dirs(missing, account, self.accounts))
        except OSError as exc:
            raise storage_error(exc, shown) from None

    async def _write(self, pending: _PendingFile, data: bytes) -> None:
        if not data:
            return
        try:
            await asyncio.to_thread(_write_all, pending.fd, data)
        except OSError as exc:
            raise storage_error(exc, pending.virtual) from None
        pending.written += len(data)

    async def _commit(self, upload: _Upload, account: Account) -> list[dict[str, Any]]:
        chown = self.accounts.can_switch and account.uid != os.geteuid()
        for pending in upload.files:
            mode = pending.existing_mode
            if mode is None:
                mode = NEW_FILE_MODE & ~UMASK
            try:
                os.fchmod(pending.fd, mode)
                if chown:
                    os.fchown(pending.fd, account.uid, account.gid)
                for key, value in upload.metadata.items():
                    os.setxattr(pending.fd, METADATA_XATTR + key, value.encode("ascii"))
                await asyncio.to_thread(os.fsync, pending.fd)
            except OSError as exc:
                if exc.errno == errno.ENOTSUP:
                    raise bad_request(
                        f"the filesystem of {pending.virtual!r} cannot store file metadata "
                        "(no extended attributes)",
                        "metadata_unsupported",
                    ) from None
                raise storage_error(exc, pending.virtual) from None
        results = []
        for pending in upload.files:
            os.close(pending.fd)
            pending.fd = -1
            os.replace(pending.tmp, pending.target)
            result: dict[str, Any] = {
                "path": pending.virtual,
                "name": pending.target.name,
                "type": "file",
            }
            if upload.metadata:
                result["metadata"] = dict(upload.metadata)
            results.append(result)
        for directory in {p.target.parent for p in upload.files}:
            _fsync_dir(directory)
        upload.files.clear()
        upload.created_dirs.clear()
        return results

    def _rollback(self, upload: _Upload) -> None:
        for pending in upload.files:
            if pending.fd >= 0:
                os.close(pending.fd)
            try:
                pending.tmp.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove %s: %s", pending.tmp, exc)
        for directory in reversed(upload.created_dirs):
            with contextlib.suppress(OSError):
                directory.rmdir()
        upload.files.clear()
        upload.created_dirs.clear()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
