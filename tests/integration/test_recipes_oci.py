"""Issue 17: `FROM oci:<path>` builds a template from an OCI image that has neither Python nor a
libc (busybox-static only), on real capsules: the image's ENV and WORKDIR carry over, COPY, RUN
and ENV work, START with no command runs the image's ENTRYPOINT + CMD and every capsule from the
template starts with it running; an unchanged rebuild is a no-op without importing again; a bad
image is refused before any capsule starts."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from backend.capsules.manager import CapsuleManager
from backend.recipes.builder import RecipeBuilder, prune
from backend.recipes.parser import RecipeError
from tests.integration.conftest import manager, scratch_images, sh
from tests.oci_images import (
    BUSYBOX_APPLETS,
    Dir,
    Entry,
    File,
    ImageConfig,
    Symlink,
    write_layout,
)

__all__ = ["manager", "scratch_images"]

pytestmark = pytest.mark.vm

RECIPE = """\
FROM oci:image
ENV GREETING=hello
COPY note.txt /data/note.txt
RUN echo "built-$GREETING in $(pwd)" > /data/built
START
"""


def _busybox_server_image(dest: Path) -> str:
    """busybox-static alone, with a config that says where to start and what to run."""
    busybox = shutil.which("busybox") or "/bin/busybox"
    layer: list[Entry] = [Dir("bin"), File("bin/busybox", Path(busybox).read_bytes(), 0o755)]
    layer += [Symlink(f"bin/{applet}", "/bin/busybox") for applet in BUSYBOX_APPLETS]
    layer += [Dir(d) for d in ("etc", "root", "proc", "sys", "dev", "srv")]
    layer.append(Dir("tmp", mode=0o1777))
    config = ImageConfig(
        env={"PATH": "/bin", "FROM_IMAGE": "yes"},
        workdir="/srv",
        entrypoint=["/bin/sh", "-c"],
        cmd=["echo up > /tmp/server-up; while :; do sleep 1; done"],
    )
    return write_layout(dest, [layer], config)


async def test_a_template_from_an_oci_image_with_no_python_and_no_libc(
    manager: CapsuleManager, short_tmp: Path, scratch_images: list[str]
) -> None:
    digest = _busybox_server_image(short_tmp / "image")
    image_name = "oci-" + digest.removeprefix("sha256:")[:12]
    scratch_images.append(image_name)
    (short_tmp / "note.txt").write_text("from the context\n")
    (short_tmp / "Recipe").write_text(RECIPE)
    progress: list[str] = []
    builder = RecipeBuilder(manager, progress=progress.append)
    result = await builder.build("bb-app", short_tmp / "Recipe")
    assert result.steps == 4 and result.cached == 0
    assert any(line.startswith("importing ") for line in progress), progress
    assert result.template.env == {"PATH": "/bin", "FROM_IMAGE": "yes", "GREETING": "hello"}
    assert result.template.workdir == "/srv"
    assert manager.list_capsules() == [], "the build capsule is gone"

    capsule = await manager.create(template="bb-app")
    out = await sh(
        manager,
        capsule.id,
        "cat /data/note.txt /data/built /tmp/server-up; pwd; echo $GREETING $FROM_IMAGE; "
        "ps | grep -c '[w]hile :'; ls /usr 2>&1 || true",
    )
    lines = out.splitlines()
    assert lines[:6] == ["from the context", "built-hello in /srv", "up", "/srv", "hello yes", "1"]
    assert "No such file" in lines[6], "the image's root has no /usr, and still has none"

    # unchanged: a no-op, nothing imported again, no capsule started
    progress.clear()
    started = time.monotonic()
    again = await RecipeBuilder(manager, progress=progress.append).build(
        "bb-app", short_tmp / "Recipe"
    )
    assert again.noop and time.monotonic() - started < 5
    assert not any(line.startswith("importing ") for line in progress)
    await manager.destroy(capsule.id)

    # prune keeps the imported image while a template builds on it, removes it after
    assert not any(n.startswith(image_name) for n in (await prune(manager)).removed)
    assert manager.templates.image(image_name) is not None
    await manager.template_remove("bb-app")
    pruned = await prune(manager)
    assert any(n.startswith(f"{image_name}@") for n in pruned.removed), pruned
    assert manager.templates.image(image_name) is None
    assert not list(manager.paths.images.glob(f"{image_name}*"))


async def test_bad_oci_bases_are_refused_before_any_capsule(
    manager: CapsuleManager, short_tmp: Path
) -> None:
    (short_tmp / "Missing").write_text("FROM oci:nothing-here\nRUN true\n")
    with pytest.raises(RecipeError, match="line 1: FROM oci:nothing-here"):
        await RecipeBuilder(manager).build("bad", short_tmp / "Missing")
    (short_tmp / "garbage.tar").write_bytes(b"not a tarball at all" * 100)
    (short_tmp / "Garbage").write_text("FROM oci:garbage.tar\nRUN true\n")
    with pytest.raises(RecipeError, match=r"line 1: FROM oci:garbage\.tar: ") as caught:
        await RecipeBuilder(manager).build("bad", short_tmp / "Garbage")
    assert "Traceback" not in str(caught.value)
    # an image with no ENTRYPOINT/CMD cannot START with no command
    write_layout(short_tmp / "bare", [[Dir("bin")]], ImageConfig())
    (short_tmp / "Bare").write_text("FROM oci:bare\nSTART\n")
    with pytest.raises(RecipeError, match="line 2: START with no command, but the OCI image"):
        await RecipeBuilder(manager).build("bad", short_tmp / "Bare")
    assert manager.list_capsules() == []
    assert manager.templates.user("bad") is None
