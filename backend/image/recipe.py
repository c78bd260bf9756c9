"""A template recipe: what goes into an image (assets/templates/<name>.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from backend.config import assets_dir
from backend.image.errors import ImageBuildError


@dataclass(frozen=True)
class Recipe:
    name: str
    suite: str
    variant: str
    kernel_package: str
    packages: tuple[str, ...]
    disk_size_mib: int
    stage1_modules: tuple[str, ...]
    user: str = ""
    """An ordinary account (uid 1000, home /home/<user>, passwordless sudo) made in the base
    layer; E2B's `base` template has `user`. Empty: root only."""

    @classmethod
    def load(cls, name: str = "default") -> Recipe:
        path = assets_dir() / "templates" / f"{name}.json"
        try:
            raw = json.loads(path.read_text())
            return cls(
                name=str(raw["name"]),
                suite=str(raw["suite"]),
                variant=str(raw.get("variant", "minbase")),
                kernel_package=str(raw["kernel_package"]),
                packages=tuple(str(p) for p in raw["packages"]),
                disk_size_mib=int(raw["disk_size_mib"]),
                stage1_modules=tuple(str(m) for m in raw["stage1_modules"]),
                user=str(raw.get("user", "")),
            )
        except FileNotFoundError as exc:
            raise ImageBuildError(f"no template recipe named {name!r}", f"expected {path}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ImageBuildError(f"template recipe {path} is malformed: {exc}") from exc

    def as_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "suite": self.suite,
                "variant": self.variant,
                "kernel_package": self.kernel_package,
                "packages": list(self.packages),
                "disk_size_mib": self.disk_size_mib,
                "stage1_modules": list(self.stage1_modules),
                "user": self.user,
            },
            sort_keys=True,
        )
