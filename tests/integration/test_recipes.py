"""Templates built from recipes on real capsules: the recipe's files, env, workdir, user and
START process are in every capsule made from the template; the layer cache makes an unchanged
rebuild a no-op and a changed last step re-run alone; a failing step, a READY that never
succeeds, a START that dies, an unknown USER and a killed agent leave no build capsule and no
half template, and never touch an existing template."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from pathlib import Path

import pytest

from backend.capsules import builds
from backend.capsules.disks import backing_chain
from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.templates import TemplateInUse
from backend.config import Paths
from backend.recipes.builder import BuildFailed, RecipeBuilder, layer_name, prune
from backend.recipes.status import active_builds
from tests.integration.conftest import sh
from tests.integration.test_user_templates import _agent

pytestmark = pytest.mark.vm

RECIPE = """\
FROM default
COPY app /opt/app
RUN useradd -m app && echo step-output-marker && sha256sum /opt/app/blob.bin
ENV GREETING="hello recipe" MODE=test
USER app
WORKDIR /srv/work
RUN echo "made by $(whoami) in $(pwd)" > note.txt
START python3 -m http.server 8321 --bind 127.0.0.1
READY --timeout=60 python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:8321/')"
"""
ASK_SERVER = (
    "python3 -c \"import urllib.request as u; print(u.urlopen('http://127.0.0.1:8321/').status)\""
)


class Log:
    def __init__(self) -> None:
        self.progress: list[str] = []
        self.output: list[str] = []

    def builder(self, manager: CapsuleManager) -> RecipeBuilder:
        self.progress.clear()
        self.output.clear()
        return RecipeBuilder(manager, progress=self.progress.append, output=self.output.append)


def _context(root: Path) -> tuple[Path, str]:
    ctx = root / "ctx"
    (ctx / "app" / "bin").mkdir(parents=True)
    blob = os.urandom(1 << 20)
    (ctx / "app" / "blob.bin").write_bytes(blob)
    (ctx / "app" / "bin" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (ctx / "app" / "bin" / "run.sh").chmod(0o755)
    (ctx / "Recipe").write_text(RECIPE)
    return ctx, hashlib.sha256(blob).hexdigest()


async def test_a_recipe_becomes_a_template_with_its_files_env_user_and_server(
    manager: CapsuleManager, short_tmp: Path
) -> None:
    ctx, blob_sha = _context(short_tmp)
    log = Log()
    result = await log.builder(manager).build("web", ctx / "Recipe")
    assert result.steps == 8 and result.cached == 0 and not result.noop
    assert "[1/8] line 2: COPY app /opt/app" in log.progress
    assert "step-output-marker" in log.output and f"{blob_sha}  /opt/app/blob.bin" in log.output
    assert manager.list_capsules() == [], "the build capsule is gone"
    template = result.template
    assert (template.user, template.workdir) == ("app", "/srv/work")
    assert template.env == {"GREETING": "hello recipe", "MODE": "test"}
    listed = [t.name for t in manager.list_templates()]
    assert "web" in listed and not any(n.startswith("layer-") for n in listed)
    hidden = {t.name for t in manager.list_templates(include_hidden=True)}
    assert {layer_name(k) for k in template.layers} <= hidden

    capsule = await manager.create(template="web")
    out = await sh(
        manager,
        capsule.id,
        "whoami; pwd; echo $GREETING $MODE; cat note.txt; sha256sum /opt/app/blob.bin; "
        "stat -c '%U %a' /opt/app/bin/run.sh /srv/work; /opt/app/bin/run.sh",
    )
    assert out.splitlines() == [
        "app",
        "/srv/work",
        "hello recipe test",
        "made by app in /srv/work",
        f"{blob_sha}  /opt/app/blob.bin",
        "root 755",
        "app 755",
        "ran",
    ]
    assert (await sh(manager, capsule.id, ASK_SERVER)).strip() == "200"
    # a template of a capsule made from the built template: still one backing link
    again = await manager.template_create(capsule.id, "web.saved")
    assert len(await backing_chain(Path(again.path) / "disk.qcow2")) == 2

    # unchanged: a no-op, no capsule started
    started = time.monotonic()
    noop = await log.builder(manager).build("web", ctx / "Recipe")
    assert noop.noop and noop.cached == 8 and time.monotonic() - started < 5
    assert noop.template.created_at == template.created_at
    assert [c.id for c in manager.list_capsules()] == [capsule.id]

    # the last step changed: only it runs; NAME is in use, so it is not replaced
    (ctx / "Recipe").write_text(RECIPE.replace("--timeout=60", "--timeout=50"))
    with pytest.raises(TemplateInUse) as in_use:
        await log.builder(manager).build("web", ctx / "Recipe")
    assert capsule.id in str(in_use.value)
    assert [p for p in log.progress if p.endswith(": cached")] == [
        f"[{i}/8] line {i + 1}: cached" for i in range(1, 8)
    ]
    ready = RECIPE.splitlines()[-1].replace("--timeout=60", "--timeout=50")
    assert f"[8/8] line 9: {ready}" in log.progress
    assert manager.templates.user("web") == template, "the template in use is untouched"
    await manager.destroy(capsule.id)
    changed = await log.builder(manager).build("web", ctx / "Recipe")
    assert changed.cached == 8 and not changed.noop, "the new last layer was kept"
    assert changed.template.layers[:7] == template.layers[:7]
    assert changed.template.layers[7] != template.layers[7]

    # prune: the old last layer is no template's; the others are kept
    pruned = await prune(manager)
    assert pruned.removed == [layer_name(template.layers[7])]
    hidden = {t.name for t in manager.list_templates(include_hidden=True) if t.hidden}
    assert hidden == {layer_name(k) for k in changed.template.layers}
    fresh = await manager.create(template="web")
    assert (await sh(manager, fresh.id, f"whoami; {ASK_SERVER}")).split() == ["app", "200"]


async def test_failing_steps_leave_cached_layers_and_the_existing_template(
    manager: CapsuleManager, short_tmp: Path
) -> None:
    recipe = short_tmp / "Recipe"
    recipe.write_text("FROM default\nRUN echo one > /one.txt\nRUN echo v1 > /v.txt\n")
    log = Log()
    first = (await log.builder(manager).build("app", recipe)).template

    bad = [
        (
            "RUN echo before-fail; echo to-stderr >&2; exit 3",
            ["step 2/2 (RUN at line 3) exited with 3", "before-fail", "to-stderr"],
        ),
        (
            "READY --timeout=2 sh -c 'echo not-yet; exit 1'",
            ["step 2/2 (READY at line 3) did not succeed within 2 s", "exited with 1", "not-yet"],
        ),
        ("START sh -c 'echo boom; exit 4'", ["(START at line 3) exited", "with 4", "boom"]),
        ("USER nosuchuser", ["(USER at line 3) failed", "nosuchuser"]),
    ]
    for line, expected in bad:
        recipe.write_text(f"FROM default\nRUN echo one > /one.txt\n{line}\n")
        with pytest.raises(BuildFailed) as failed:
            await log.builder(manager).build("app", recipe)
        for text in expected:
            assert text in str(failed.value), (line, str(failed.value))
        assert "[1/2] line 2: cached" in log.progress, "the first step's layer stayed"
        assert manager.list_capsules() == [], "the build capsule was destroyed"
        assert manager.templates.user("app") == first, "the existing template is untouched"
    assert not list(manager.layout.work.iterdir())

    # --no-cache runs every step again (same keys: the layers are replaced) and replaces NAME
    recipe.write_text("FROM default\nRUN echo one > /one.txt\nRUN echo v1 > /v.txt\n")
    rebuilt = await log.builder(manager).build("app", recipe, no_cache=True)
    assert rebuilt.cached == 0 and not rebuilt.noop
    assert "[1/2] line 2: RUN echo one > /one.txt" in log.progress
    assert rebuilt.template.layers == first.layers
    assert rebuilt.template.created_at > first.created_at
    layer = manager.templates.user(layer_name(first.layers[0]))
    assert layer is not None and layer.created_at > first.created_at

    capsule = await manager.create(template="app")
    assert (await sh(manager, capsule.id, "cat /one.txt /v.txt")).split() == ["one", "v1"]


async def test_a_full_disk_during_a_build_is_a_clear_error_and_leaves_nothing_half_made(
    manager: CapsuleManager, short_tmp: Path, tiny_fs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The build's work dir (COPY's tar, each layer's capture) on a 128 KiB filesystem."""
    recipe = short_tmp / "Recipe"
    recipe.write_text("FROM default\nRUN echo one > /one.txt\n")
    log = Log()
    first = (await log.builder(manager).build("app", recipe)).template
    (short_tmp / "big.bin").write_bytes(os.urandom(1 << 20))
    recipe.write_text("FROM default\nRUN echo one > /one.txt\nCOPY big.bin /big.bin\n")
    monkeypatch.setattr(type(manager.layout), "work", property(lambda self: tiny_fs / "work"))
    with pytest.raises(CapsuleError) as failed:
        await log.builder(manager).build("app", recipe)
    monkeypatch.undo()
    message = str(failed.value)
    assert "build of app failed: the disk is full" in message, message
    assert "build again" in message
    assert "Traceback" not in message
    assert manager.list_capsules() == [], "the build capsule was destroyed"
    assert manager.templates.user("app") == first, "the existing template is untouched"
    assert manager.templates.user(layer_name(first.layers[0])) is not None, "the cached layer"
    assert list((tiny_fs / "work").iterdir()) == []


async def test_an_agent_killed_mid_build_leaves_no_capsule_and_no_template(
    manager: CapsuleManager, paths: Paths, short_tmp: Path
) -> None:
    recipe = short_tmp / "Recipe"
    recipe.write_text("FROM default\nRUN echo started; sleep 600\n")
    agent = _agent(paths, "template", "build", "halfway", "-f", str(recipe))
    deadline = time.monotonic() + 180
    build = None
    while time.monotonic() < deadline:
        running = [c for c in manager.list_capsules() if builds.is_build(c) and c.pid]
        if running and running[0].state == "running":
            build = running[0]
            break
        assert agent.poll() is None, agent.stderr.read() if agent.stderr else ""
        await asyncio.sleep(0.2)
    else:
        pytest.fail("the build never started its capsule")
    # the build is visible from this process too: its step and, once printed, its output
    deadline = time.monotonic() + 60
    while True:
        [status] = active_builds(manager.layout.work)
        if "   started" in status.log or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert "   started" in status.log, status.log  # inside the RUN step now
    assert (status.name, status.step, status.steps) == ("halfway", 1, 1)
    assert status.current == "[1/1] line 2: RUN echo started; sleep 600"
    agent.send_signal(signal.SIGKILL)
    agent.wait()
    assert build.pid is not None
    os.kill(build.pid, 0)  # the build's QEMU outlived the agent

    restarted = CapsuleManager(paths)
    try:
        await restarted.start(watchdog=False)
        assert restarted.list_capsules() == []
        assert restarted.templates.user("halfway") is None
        assert [t for t in restarted.list_templates(include_hidden=True) if not t.builtin] == []
        assert list(restarted.layout.work.iterdir()) == []
        assert active_builds(restarted.layout.work) == []
        with pytest.raises(ProcessLookupError):
            for _ in range(50):
                os.kill(build.pid, 0)
                await asyncio.sleep(0.1)
    finally:
        await restarted.close()
