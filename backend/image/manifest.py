"""The image manifest: versions, sizes and content hashes of everything in an image dir."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
IMAGE_FORMAT = 1


@dataclass(frozen=True)
class ImageFile:
    name: str
    size: int
    """Apparent size in bytes."""
    allocated: int
    """Bytes actually allocated on disk (the rootfs is sparse)."""
    sha256: str
    """SHA-256 over the file's data extents (backend/sparse.py): holes are not read."""


@dataclass(frozen=True)
class ImageManifest:
    name: str
    format: int
    input_key: str
    """Hash of every input; an image whose key matches the current inputs is up to date."""
    built_at: float
    build_seconds: float
    kernel_package: str
    kernel_version: str
    kernel_release: str
    suite: str
    envd_version: str
    python_version: str
    stage_keys: dict[str, str]
    files: dict[str, ImageFile] = field(default_factory=dict)
    template_snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Warm-start snapshots booted from this image (backend/capsules/templates.py)."""

    @property
    def version(self) -> str:
        """A short human-readable image version: the first 12 hex digits of the input key."""
        return self.input_key[:12]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ImageManifest:
        files = {k: ImageFile(**v) for k, v in raw.get("files", {}).items()}
        fields = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__ and k != "files"}
        return cls(files=files, **fields)


def load_manifest(image_dir: Path) -> ImageManifest | None:
    """The manifest of an image dir, or None when there is no complete image there."""
    try:
        raw = json.loads((image_dir / MANIFEST_NAME).read_text())
        return ImageManifest.from_dict(raw)
    except (OSError, ValueError, TypeError):
        return None
