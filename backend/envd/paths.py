"""Map paths of the API (the guest's namespace) to real paths.

In the guest the two are the same. In host mode the directory given by ``--root`` stands in
for ``/``: ``/x/y`` means ``ROOT/x/y``, relative paths start at the user's home under ROOT,
and nothing may leave ROOT, neither by ``..`` nor through a symlink.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import bad_request, forbidden

PATH_MAX = 4096
NAME_MAX = 255


class PathResolver:
    def __init__(self, root: Path | None) -> None:
        self.root = Path(os.path.realpath(root)) if root is not None else None

    def virtual(self, api_path: str, home: str) -> str:
        """The normalised absolute API path that ``api_path`` names for a user with ``home``."""
        if not api_path:
            raise bad_request("path must not be empty", "invalid_path")
        if "\0" in api_path:
            raise bad_request("path must not contain NUL bytes", "invalid_path")
        joined = api_path if api_path.startswith("/") else f"{home.rstrip('/')}/{api_path}"
        room = PATH_MAX - 1 - (len(os.fsencode(self.root)) if self.root is not None else 0)
        if len(joined.encode("utf-8", "surrogateescape")) > room:
            raise bad_request(f"path is longer than {room} bytes", "name_too_long")
        parts: list[str] = []
        for component in joined.split("/"):
            if len(component.encode("utf-8", "surrogateescape")) > NAME_MAX:
                raise bad_request(
                    f"a path component is longer than {NAME_MAX} bytes", "name_too_long"
                )
            if component in ("", "."):
                continue
            if component == "..":
                if not parts:
                    if self.root is not None:
                        raise forbidden(f"path {api_path!r} escapes the root", "path_escape")
                    continue
                parts.pop()
            else:
                parts.append(component)
        return "/" + "/".join(parts)

    def to_real(self, api_path: str, home: str) -> Path:
        return self.real_of_virtual(self.virtual(api_path, home), api_path)

    def real_of_virtual(self, virtual: str, shown: str | None = None) -> Path:
        if self.root is None:
            return Path(virtual)
        real = Path(os.path.realpath(self.root / virtual.lstrip("/")))
        if real != self.root and self.root not in real.parents:
            name = shown if shown is not None else virtual
            raise forbidden(f"path {name!r} resolves outside the root", "path_escape")
        return real

    def contains(self, real: Path) -> bool:
        """Whether a resolved real path is inside the root (always, in a guest)."""
        return self.root is None or real == self.root or self.root in real.parents

    def to_virtual(self, real: Path) -> str:
        if self.root is None:
            return str(real)
        try:
            rel = real.relative_to(self.root)
        except ValueError:
            return str(real)
        text = rel.as_posix()
        return "/" if text == "." else "/" + text
