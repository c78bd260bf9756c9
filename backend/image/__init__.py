"""The capsule image: kernel, stage-1 initramfs and root filesystem with envd, plus its manifest."""

from backend.image.builder import BuildProgress, ImageBuilder, ImageStatus
from backend.image.errors import ImageBuildError
from backend.image.manifest import ImageManifest, load_manifest

__all__ = [
    "BuildProgress",
    "ImageBuildError",
    "ImageBuilder",
    "ImageManifest",
    "ImageStatus",
    "load_manifest",
]
