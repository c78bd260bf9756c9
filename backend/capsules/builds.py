"""How a recipe build marks its capsule, so that a start-up after a killed build removes it.

The builder holds a locked work dir (CapsuleLayout.work_dir) for the whole build and records
its path in the capsule's `extra`. A start-up first removes work dirs no live agent holds, so
a build capsule whose work dir is gone belongs to a build that is over.
"""

from __future__ import annotations

from pathlib import Path

from backend.capsules.models import Capsule

BUILD = "build"
BUILD_DIR = "build_dir"


def labels(name: str, work: Path) -> dict[str, object]:
    return {BUILD: name, BUILD_DIR: str(work)}


def is_build(capsule: Capsule) -> bool:
    return bool(capsule.extra.get(BUILD))


def build_abandoned(capsule: Capsule) -> bool:
    work = capsule.extra.get(BUILD_DIR)
    return is_build(capsule) and not (isinstance(work, str) and Path(work).is_dir())
