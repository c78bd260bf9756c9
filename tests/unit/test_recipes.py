"""Recipes without VMs: the parser, COPY's context checks and hashing, the refusals that come
before any capsule starts (driven with a fake runtime that records every VM it would start),
and the removal of a killed build's capsule at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backend.capsules import builds
from backend.capsules.manager import CapsuleManager
from backend.config import Paths
from backend.recipes.builder import RecipeBuilder
from backend.recipes.context import plan_copy, write_tar
from backend.recipes.parser import RecipeError, Step, parse
from tests.unit.fakes import FakeEnvds, FakeRuntime

GOOD = """\
# a comment
FROM default

COPY app /opt/app
run apt-get update && \\
    echo continued
ENV A=1 B="two words"
ENV OLD style value
WORKDIR /srv
WORKDIR sub
COPY one.txt two.txt ./
USER app
START ["python3", "-m", "http.server"]
READY --timeout=5 curl -fs localhost:8000
"""


def test_a_good_recipe_parses_into_its_steps() -> None:
    recipe = parse(GOOD)
    assert recipe.base == "default" and recipe.base_line == 2
    kinds = [(s.line, s.instruction) for s in recipe.steps]
    assert kinds == [
        (4, "COPY"),
        (5, "RUN"),
        (7, "ENV"),
        (8, "ENV"),
        (9, "WORKDIR"),
        (10, "WORKDIR"),
        (11, "COPY"),
        (12, "USER"),
        (13, "START"),
        (14, "READY"),
    ]
    steps = recipe.steps
    assert steps[0].sources == ("app",) and steps[0].target == "/opt/app"
    assert steps[1].command == "apt-get update && echo continued"
    assert steps[2].env == (("A", "1"), ("B", "two words"))
    assert steps[3].env == (("OLD", "style value"),)
    assert steps[5].target == "/srv/sub"
    # several sources: the destination is a directory, relative to WORKDIR
    assert steps[6].sources == ("one.txt", "two.txt") and steps[6].target == "/srv/sub/"
    assert steps[7].target == "app"
    assert steps[8].command == "python3 -m http.server"
    assert steps[9].timeout_s == 5 and steps[9].command == "curl -fs localhost:8000"
    assert not steps[2].changes_state and steps[4].changes_state


def test_from_oci_and_start_with_no_command() -> None:
    recipe = parse("FROM oci:images/app.tar\nENV A=1\nSTART\n")
    assert recipe.oci_path == "images/app.tar"
    assert recipe.steps[1].instruction == "START" and recipe.steps[1].command == ""
    assert parse("FROM default\nRUN true\n").oci_path is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no FROM"),
        ("# only a comment\n", "no FROM"),
        ("FROM default\n", "line 1: nothing after FROM"),
        ("RUN true\n", "line 1: the recipe must start with FROM"),
        ("FROM default\nRUN true\nFROM other\n", "line 3: a second FROM"),
        ('FROM default\nCMD ["x"]\n', "line 2: unknown instruction 'CMD'"),
        ("FROM default\n\nRUN true\nFROBNICATE x\n", "line 4: unknown instruction 'FROBNICATE'"),
        ("FROM a b\nRUN true\n", "line 1: FROM takes one template name"),
        ("FROM oci:\nRUN true\n", "line 1: FROM oci: needs a path"),
        ("FROM default\nSTART\n", "line 2: START needs a command (START with none runs an OCI"),
        ("FROM default\nRUN\n", "line 2: RUN needs a command"),
        ('FROM default\nRUN ["a", 1]\n', "line 2: RUN [...] must be a JSON list"),
        ("FROM default\nCOPY onlyone\n", "line 2: COPY needs a source and a destination"),
        ("FROM default\nCOPY --chown=a:b x y\n", "line 2: COPY --chown=a:b is not supported"),
        ("FROM default\nENV\n", "line 2: ENV needs"),
        ("FROM default\nENV 1BAD=x\n", "line 2: ENV: '1BAD' is not a valid variable name"),
        ("FROM default\nENV ALONE\n", "line 2: ENV ALONE needs a value"),
        ("FROM default\nENV A='unclosed\n", "line 2: ENV:"),
        ("FROM default\nWORKDIR\n", "line 2: WORKDIR takes one path"),
        ("FROM default\nUSER a b\n", "line 2: USER takes one account name"),
        ("FROM default\nREADY --every=3 true\n", "line 2: READY takes only --timeout"),
        ("FROM default\nREADY --timeout=0 true\n", "line 2: READY --timeout must be"),
        ("FROM default\nRUN echo \\\n", "line 2: the recipe ends inside a continued line"),
    ],
)
def test_bad_recipes_are_refused_with_their_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as caught:
        parse(text)
    assert message in str(caught.value)


def _copy(line: int, *words: str) -> Step:
    recipe = parse("FROM default\nCOPY " + " ".join(words) + "\n")
    step = recipe.steps[0]
    return Step(line, step.instruction, step.args, sources=step.sources, target=step.target)


@pytest.fixture
def context(tmp_path: Path) -> Path:
    ctx = tmp_path / "ctx"
    (ctx / "app" / "sub").mkdir(parents=True)
    (ctx / "app" / "a.txt").write_text("a")
    (ctx / "app" / "sub" / "b.sh").write_text("#!/bin/sh\n")
    (ctx / "app" / "sub" / "b.sh").chmod(0o755)
    os.symlink("a.txt", ctx / "app" / "link")
    (ctx / "one.txt").write_text("one")
    (tmp_path / "secret").write_text("outside")
    return ctx


def test_copy_plans_a_directory_and_files_into_place(context: Path, tmp_path: Path) -> None:
    plan = plan_copy(_copy(2, "app", "/opt/app"), context)
    members = {e.member: (e.kind, e.mode, e.link) for e in plan.entries}
    assert members == {
        "opt/app": ("dir", 0o755, ""),
        "opt/app/sub": ("dir", 0o755, ""),
        "opt/app/a.txt": ("file", 0o644, ""),
        "opt/app/link": ("symlink", 0o777, "a.txt"),
        "opt/app/sub/b.sh": ("file", 0o755, ""),
    }
    tar = tmp_path / "x.tar"
    write_tar(plan, tar)
    with tarfile.open(tar) as t:
        got = {m.name: (m.uid, m.mode) for m in t.getmembers()}
    assert got["opt/app/sub/b.sh"] == (0, 0o755) and got["opt/app/a.txt"] == (0, 0o644)
    into = plan_copy(_copy(3, "one.txt", "/etc/"), context)
    assert [e.member for e in into.entries] == ["etc/one.txt"]
    renamed = plan_copy(_copy(3, "one.txt", "/etc/renamed"), context)
    assert [e.member for e in renamed.entries] == ["etc/renamed"]


@pytest.mark.parametrize(
    ("setup", "src", "message"),
    [
        (None, "../secret", "leaves the context"),
        (None, "app/../../secret", "leaves the context"),
        (None, "missing.txt", "no such file in the context"),
        (lambda c: os.symlink(c.parent / "secret", c / "ln"), "ln", "outside the context"),
        (lambda c: os.symlink("/", c / "root"), "root", "outside the context"),
        (
            lambda c: os.symlink("../../../secret", c / "app" / "sub" / "out"),
            "app",
            "app/sub/out is a symlink to",
        ),
        (lambda c: os.mkfifo(c / "fifo"), "fifo", "not a regular file or directory"),
        (None, "a*.txt", "wildcards are not supported"),
    ],
)
def test_copy_never_reads_outside_the_context(
    context: Path, setup: object, src: str, message: str
) -> None:
    if callable(setup):
        setup(context)
    with pytest.raises(RecipeError) as caught:
        plan_copy(_copy(7, src, "/x"), context)
    assert f"line 7: COPY {src}" in str(caught.value) and message in str(caught.value)


def test_the_copy_hash_follows_content_not_timestamps(context: Path) -> None:
    step = _copy(2, "app", "/opt/app")
    first = plan_copy(step, context).digest
    os.utime(context / "app" / "a.txt", (1, 1))
    assert plan_copy(step, context).digest == first
    (context / "app" / "a.txt").write_text("b")
    changed = plan_copy(step, context).digest
    assert changed != first
    (context / "app" / "a.txt").chmod(0o600)
    assert plan_copy(step, context).digest != changed
    assert (
        plan_copy(_copy(2, "app", "/elsewhere"), context).digest != plan_copy(step, context).digest
    )


# -- refused before any capsule starts ----------------------------------------------------------


@pytest.fixture
async def manager(paths: Paths) -> AsyncIterator[tuple[CapsuleManager, FakeRuntime]]:
    runtime = FakeRuntime()
    m = CapsuleManager(paths, runtime=runtime, envd=FakeEnvds())
    await m.start(watchdog=False)
    try:
        yield m, runtime
    finally:
        await m.close()


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("FROM nosuch\nRUN true\n", "line 1: FROM nosuch: no such template"),
        ("FROM default\nRUN true\nADD x /x\n", "line 3: unknown instruction 'ADD'"),
        ("FROM default\nCOPY ../secret /x\n", "line 2: COPY ../secret"),
        ("FROM default\nCOPY ln /x\n", "line 2: COPY ln: it resolves to"),
    ],
)
async def test_bad_input_is_refused_before_any_capsule_starts(
    manager: tuple[CapsuleManager, FakeRuntime],
    context: Path,
    recipe: str,
    message: str,
) -> None:
    m, runtime = manager
    os.symlink(context.parent / "secret", context / "ln")
    (context / "Recipe").write_text(recipe)
    with pytest.raises(RecipeError) as caught:
        await RecipeBuilder(m).build("built", context / "Recipe")
    assert message in str(caught.value)
    assert runtime.vms == {} and m.list_capsules() == []
    assert m.templates.user("built") is None


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Bad Name", "invalid template name"),
        ("default", "is a built-in template"),
        ("layer-abc", "are for the cache"),
    ],
)
async def test_bad_names_are_refused(
    manager: tuple[CapsuleManager, FakeRuntime], context: Path, name: str, message: str
) -> None:
    m, runtime = manager
    (context / "Recipe").write_text("FROM default\nRUN true\n")
    with pytest.raises(Exception) as caught:
        await RecipeBuilder(m).build(name, context / "Recipe")
    assert message in str(caught.value) and runtime.vms == {}


async def test_a_missing_recipe_file_is_a_clear_error(
    manager: tuple[CapsuleManager, FakeRuntime], tmp_path: Path
) -> None:
    m, runtime = manager
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        await RecipeBuilder(m).build("x", tmp_path / "nope")
    assert runtime.vms == {}


async def test_start_up_removes_the_capsule_of_a_build_that_is_over(
    paths: Paths, tmp_path: Path
) -> None:
    """A build's capsule (marked with its locked work dir) outlives a killed agent; the next
    start removes it and its VM, and leaves the capsule of a build still running alone."""
    runtime, envds = FakeRuntime(), FakeEnvds()
    m = CapsuleManager(paths, runtime=runtime, envd=envds)
    await m.start(watchdog=False)
    live_work = tmp_path / "live-build"
    live_work.mkdir()
    dead = await m.create(cold=True, labels=builds.labels("x", tmp_path / "gone"))
    live = await m.create(cold=True, labels=builds.labels("y", live_work))
    plain = await m.create(cold=True)
    await m.close()
    assert builds.is_build(dead) and builds.build_abandoned(dead)
    assert not builds.build_abandoned(live) and not builds.is_build(plain)

    again = CapsuleManager(paths, runtime=runtime, envd=envds)
    await again.start(watchdog=False)
    try:
        left = {c.id for c in again.list_capsules()}
        assert left == {live.id, plain.id}
        assert dead.pid is not None and not runtime.vms[dead.pid].alive()
        assert live.pid is not None and runtime.vms[live.pid].alive()
    finally:
        await again.close()


def test_the_cli_refuses_a_bad_recipe_with_its_line(paths: Paths, tmp_path: Path) -> None:
    """`template build` prints the error (file and line) and exits 1, having started nothing."""
    recipe = tmp_path / "Recipe"
    recipe.write_text("FROM default\nRUN true\nEXPOSE 80\n")
    env = {
        **os.environ,
        "WRENN_STATE_DIR": str(paths.state),
        "WRENN_CONFIG_DIR": str(paths.config),
    }
    result = subprocess.run(
        [sys.executable, "-m", "backend.cli", "template", "build", "web", "-f", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"error: {recipe}: line 3: unknown instruction 'EXPOSE'" in result.stderr
    listed = subprocess.run(
        [sys.executable, "-m", "backend.cli", "template", "list", "--all", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert [t["name"] for t in json.loads(listed.stdout)] == ["default"]


def test_a_running_build_is_listed_with_its_step_and_log(paths: Paths) -> None:
    """Any process sees a build while its work dir is held; not once it is over."""
    from backend.capsules.layout import CapsuleLayout
    from backend.recipes.status import BuildStatus, StatusWriter, active_builds

    layout = CapsuleLayout(paths)
    with layout.work_dir("build") as work:
        writer = StatusWriter(work, BuildStatus("web", "/r/Recipe", 1.0, 0, 3))
        writer.progress("[1/3] line 2: RUN make", step=1)
        writer.output("compiling")
        [status] = active_builds(layout.work)
        assert (status.name, status.step, status.steps) == ("web", 1, 3)
        assert status.current == "[1/3] line 2: RUN make"
        assert status.log == ["[1/3] line 2: RUN make", "   compiling"]
    assert active_builds(layout.work) == []
