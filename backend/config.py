"""Where wrenn-tui keeps its files, and the settings a user can change.

Every directory comes from platformdirs (XDG on Linux) and can be moved with an environment
variable, so tests and CI can point a whole agent at a scratch directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

APP_NAME = "wrenn-tui"


def _dir_from_env(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser() if value else Path(default)


@dataclass(frozen=True)
class Paths:
    """The directories of one agent installation."""

    data: Path
    """Images and template snapshots (`WRENN_DATA_DIR`, default the XDG data dir)."""
    state: Path
    """The state database, capsule run dirs and snapshots (`WRENN_STATE_DIR`)."""
    cache: Path
    """Downloaded kernel packages and the debootstrapped base layer (`WRENN_CACHE_DIR`)."""
    config: Path
    """The config directory (`WRENN_CONFIG_DIR`)."""
    shm: Path
    """Where guest RAM files live while a capsule runs (`WRENN_SHM_DIR`, default /dev/shm)."""

    @property
    def images(self) -> Path:
        return self.data / "images"

    @property
    def capsules(self) -> Path:
        return self.state / "capsules"

    @property
    def snapshots(self) -> Path:
        return self.state / "snapshots"

    @property
    def database(self) -> Path:
        return self.state / "state.db"

    def image_dir(self, name: str) -> Path:
        return self.images / name

    def ensure(self) -> None:
        """Create the private directories (mode 0700: snapshots hold guest memory)."""
        for path in (self.data, self.state, self.cache, self.images, self.capsules, self.snapshots):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o700)


def default_paths() -> Paths:
    return Paths(
        data=_dir_from_env("WRENN_DATA_DIR", platformdirs.user_data_dir(APP_NAME)),
        state=_dir_from_env("WRENN_STATE_DIR", platformdirs.user_state_dir(APP_NAME)),
        cache=_dir_from_env("WRENN_CACHE_DIR", platformdirs.user_cache_dir(APP_NAME)),
        config=_dir_from_env("WRENN_CONFIG_DIR", platformdirs.user_config_dir(APP_NAME)),
        shm=_dir_from_env("WRENN_SHM_DIR", "/dev/shm"),
    )


@dataclass(frozen=True)
class Settings:
    """What a user can change besides the directories, each from one environment variable."""

    accel: str | None
    """`WRENN_ACCEL=kvm|tcg` skips the accelerator probe; anything else means probe."""
    debian_mirror: str | None
    """`WRENN_DEBIAN_MIRROR`: the mirror image builds download from (default: apt's own)."""
    internet_allow: tuple[str, ...] = ()
    """`WRENN_INTERNET_ALLOW=10.1.0.0/16,192.168.5.7`: ranges an `internet` capsule may reach
    although they are private or special (blocked by default: backend/runtime/network.py)."""


def settings() -> Settings:
    accel = os.environ.get("WRENN_ACCEL")
    return Settings(
        accel=accel if accel in ("kvm", "tcg") else None,
        debian_mirror=os.environ.get("WRENN_DEBIAN_MIRROR") or None,
        internet_allow=tuple(
            part.strip()
            for part in os.environ.get("WRENN_INTERNET_ALLOW", "").split(",")
            if part.strip()
        ),
    )


def assets_dir() -> Path:
    """The `assets/` folder: beside the packages in a checkout, inside the wheel otherwise."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "assets", here / "assets"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"assets directory not found near {here}")
