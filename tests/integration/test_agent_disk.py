"""Issue 17: envd and PID 1 run from the read-only agent disk with their own Python, loader and
libraries, so they need nothing from the image: the default Debian image's /usr is only the
image's, and an image with neither Python nor a libc (a busybox-static root) runs capsules that
exec, write, pause and resume (real VMs)."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from backend.capsules.manager import CapsuleManager
from backend.config import Paths
from backend.image.builder import ImageBuilder
from backend.image.tools import find_static_busybox
from tests.integration.conftest import manager, scratch_images

__all__ = ["manager", "scratch_images"]

pytestmark = pytest.mark.vm

AGENT_INIT = "/.wrenn/lib/ld-linux-x86-64.so.2"


async def test_default_image_runs_envd_from_the_agent_disk(manager: CapsuleManager) -> None:
    capsule = await manager.create()
    result = await manager.exec(
        capsule.id,
        "tr '\\0' ' ' < /proc/1/cmdline; echo; "
        "ps -eo args | grep '^/.wrenn/lib/.* -m backend.envd'; "
        "grep ' /.wrenn ' /proc/mounts; "
        "echo opt=$(ls -A /opt | tr '\\n' ,); "
        "test -e /usr/sbin/wrenn-init && echo init-in-image; "
        "touch /.wrenn/x 2>&1; "
        "python3 -c 'import sys; print(sys.prefix)'",
    )
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{AGENT_INIT} --library-path /.wrenn/lib "), lines
    assert lines[0].rstrip().endswith("/.wrenn/init")
    assert lines[1].startswith(AGENT_INIT) and "-m backend.envd" in lines[1], lines
    mount = lines[2].split()
    assert mount[1] == "/.wrenn" and mount[2] == "ext4" and "ro" in mount[3].split(","), lines
    # nothing of the agent in the image's own paths; the user's python3 is the image's
    assert lines[3] == "opt=", lines
    assert "init-in-image" not in lines
    assert "Read-only file system" in lines[4], lines
    assert lines[-1] == "/usr", lines


def _busybox_root(tree: Path) -> None:
    """A root of only busybox-static: no Python, no libc, no loader, no passwd."""
    for d in ("bin", "etc", "tmp", "root", "proc", "sys", "dev"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(find_static_busybox(), tree / "bin" / "busybox")
    for applet in ("sh", "ls", "cat", "echo", "sleep", "ps", "sync", "test"):
        (tree / "bin" / applet).symlink_to("busybox")
    (tree / "etc" / "resolv.conf").write_text("nameserver 10.0.2.3\n")


@pytest.fixture
def busybox_image(paths: Paths, short_tmp: Path, scratch_images: list[str]) -> str:
    name = f"test-bb-{secrets.token_hex(3)}"
    tree = short_tmp / "tree"
    _busybox_root(tree)
    ext4 = short_tmp / "rootfs.ext4"
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", tree, ext4, "256M"],
        check=True,
    )
    scratch_images.append(name)
    ImageBuilder(paths, name).install_derived("default", ext4, f"test {name}")
    return name


async def test_envd_runs_in_an_image_with_no_python_and_no_libc(
    manager: CapsuleManager, busybox_image: str
) -> None:
    capsule = await manager.create(template=busybox_image)
    probe = await manager.exec(
        capsule.id, "ls / /usr /lib /lib64 2>&1; tr '\\0' ' ' < /proc/1/cmdline"
    )
    assert "/usr: No such file" in probe.stdout, probe.stdout
    assert "/lib: No such file" in probe.stdout and "/lib64: No such file" in probe.stdout
    assert f"{AGENT_INIT} --library-path /.wrenn/lib" in probe.stdout
    wrote = await manager.exec(capsule.id, "echo kept > /root/note && sync && cat /root/note")
    assert wrote.exit_code == 0 and wrote.stdout == "kept\n", wrote
    await manager.pause(capsule.id)
    await manager.resume(capsule.id)
    again = await manager.exec(capsule.id, "cat /root/note; ls /bin | wc -l")
    assert again.stdout.split() == ["kept", "9"], again.stdout
