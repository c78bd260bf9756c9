"""The headless `wrenn-tui` subcommands (the `wrenn-tui` entry point itself is `tui.cli`,
which adds the dashboard as the default; nothing here imports the TUI)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from backend.api.cli import api_key, serve
from backend.config import default_paths


@click.group()
def main() -> None:
    """wrenn-tui: microVM sandboxes (capsules) on your own machine, watched live."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(as_json: bool) -> None:
    """Check whether capsules can run here; exit non-zero when they cannot."""
    from backend.doctor import can_run_capsules, run_checks

    checks = run_checks(default_paths())
    ok = can_run_capsules(checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            mark = (
                click.style("ok  ", fg="green")
                if c.ok
                else click.style("FAIL" if c.fatal else "warn", fg="red" if c.fatal else "yellow")
            )
            line = f"{mark} {c.name:<10} {c.detail}"
            if c.fix and not c.ok:
                line += f"\n     {'':<10} fix: {c.fix}"
            click.echo(line)
        click.echo("capsules can run" if ok else "capsules cannot run: see the fixes above")
    sys.exit(0 if ok else 1)


@main.group()
def image() -> None:
    """Build and inspect capsule images."""


@image.command("build")
@click.option("--force", is_flag=True, help="Rebuild every stage, ignoring the caches.")
@click.option(
    "--no-template-snapshot", is_flag=True, help="Do not boot the template to snapshot it."
)
def image_build(force: bool, no_template_snapshot: bool) -> None:
    """Build the default image (a no-op when nothing changed)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from backend.image import ImageBuilder, ImageBuildError

    builder = ImageBuilder(default_paths())
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task("checking", total=1.0)

        def report(step: str, fraction: float) -> None:
            progress.update(task, description=step, completed=fraction)

        try:
            manifest = builder.build(force=force, progress=report)
        except ImageBuildError as exc:
            progress.stop()
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"  fix: {exc.hint}", err=True)
            sys.exit(1)
    if manifest is None:
        status = builder.status()
        assert status.manifest is not None
        click.echo(f"image {status.name} {status.manifest.version} is up to date: nothing to do")
    else:
        rootfs = manifest.files["rootfs.ext4"]
        click.echo(
            f"built image {manifest.name} {manifest.version} in {manifest.build_seconds:.1f} s "
            f"(kernel {manifest.kernel_release}, rootfs {rootfs.allocated / 2**20:.0f} MiB "
            f"allocated of {rootfs.size / 2**20:.0f} MiB) at {builder.image_dir}"
        )
    if not no_template_snapshot:
        _ensure_template_snapshot(builder.image_dir.resolve())


def _ensure_template_snapshot(image_dir: Path) -> None:
    """Boot the template once and snapshot it, so `capsule create` restores in about a second
    instead of cold-booting (skipped when it exists: `image build` stays a fast no-op)."""
    from backend.capsules.errors import CapsuleError
    from backend.capsules.manager import DEFAULT_MEMORY_MIB, CapsuleManager
    from backend.capsules.templates import snapshot_key
    from backend.runtime.accel import probe_accel

    accel = probe_accel(image_dir / "vmlinux").accel
    if accel == "none":
        click.echo("no template snapshot: QEMU cannot run guests here (`wrenn-tui doctor`)")
        return
    manager = CapsuleManager(default_paths(), accel=accel)
    key = snapshot_key(DEFAULT_MEMORY_MIB, 1, accel)
    try:
        if manager.warm.load(image_dir, key) is not None:
            return
        started = time.monotonic()
        snap = _run(
            manager.warm.ensure(image_dir, DEFAULT_MEMORY_MIB, 1, accel, progress=click.echo)
        )
    except CapsuleError as exc:
        click.echo(f"warning: {exc}; capsules will cold-boot", err=True)
        return
    finally:
        manager.store.close()
    click.echo(
        f"template snapshot {key}: {(snap.ram_allocated + snap.disk_allocated) / 2**20:.0f}"
        f" MiB, booted and saved in {time.monotonic() - started:.1f} s"
    )


@image.command("list")
@click.option("--json", "as_json", is_flag=True)
def image_list(as_json: bool) -> None:
    """List the images in the data dir."""
    from backend.image import ImageBuilder

    statuses = ImageBuilder(default_paths()).list_images()
    if as_json:
        out: list[dict[str, Any]] = []
        for s in statuses:
            out.append(
                {
                    "name": s.name,
                    "path": str(s.path),
                    "present": s.present,
                    "up_to_date": s.up_to_date,
                    "manifest": asdict(s.manifest) if s.manifest else None,
                }
            )
        click.echo(json.dumps(out, indent=2))
        return
    if not statuses:
        click.echo("no images: run `wrenn-tui image build`")
    for s in statuses:
        if s.manifest is None:
            click.echo(f"{s.name:<10} incomplete  {s.path}")
            continue
        m = s.manifest
        size = sum(f.allocated for f in m.files.values()) / 2**20
        state = "current" if s.up_to_date else "outdated"
        click.echo(
            f"{s.name:<10} {m.version}  {state:<8} kernel {m.kernel_release}  "
            f"envd {m.envd_version}  {size:.0f} MiB  {s.path}"
        )


# -- capsules ---------------------------------------------------------------------------------


def _run(coro: Any) -> Any:
    import asyncio

    return asyncio.run(coro)


def _capsule_dict(c: Any) -> dict[str, Any]:
    data = asdict(c)
    data["state"] = c.state.value
    data.pop("access_token", None)
    return data


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


async def _with_manager(fn: Any) -> Any:
    from backend.capsules.manager import CapsuleManager

    manager = CapsuleManager(default_paths())
    try:
        await manager.start(watchdog=False)
        return await fn(manager)
    finally:
        await manager.close()


@main.group()
def capsule() -> None:
    """Create, inspect, pause, resume, destroy capsules and run commands in them."""


@capsule.command("create")
@click.option(
    "--memory", "memory_mib", type=int, help="RAM in MiB [default: 256; a saved template's own]"
)
@click.option("--vcpus", type=int, help="[default: 1; a saved template's own]")
@click.option(
    "--template",
    default="default",
    show_default=True,
    help="An image or a saved template (`wrenn-tui template list`).",
)
@click.option("--auto-pause", "auto_pause_s", default=0, help="Pause after N idle seconds.")
@click.option("--cold", is_flag=True, help="Boot from scratch instead of the warm snapshot.")
@click.option(
    "--network",
    type=click.Choice(["none", "internet"]),
    help="none (default): no network but envd's forward; internet: NAT out, never to this "
    "host. A saved template keeps its own.",
)
@click.option("--json", "as_json", is_flag=True)
def capsule_create(
    memory_mib: int | None,
    vcpus: int | None,
    template: str,
    auto_pause_s: int,
    cold: bool,
    network: str | None,
    as_json: bool,
) -> None:
    """Start a new capsule (from the template's warm snapshot) and wait until envd answers."""
    from backend.capsules.errors import CapsuleError

    def progress(message: str) -> None:
        if not as_json:
            click.echo(message, err=True)

    try:
        c = _run(
            _with_manager(
                lambda m: m.create(
                    memory_mib=memory_mib,
                    vcpus=vcpus,
                    template=template,
                    auto_pause_s=auto_pause_s,
                    cold=cold,
                    network=network,
                    progress=progress,
                )
            )
        )
    except CapsuleError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(_capsule_dict(c), indent=2))
    else:
        click.echo(
            f"{c.id} running ({c.memory_mib} MiB, {c.vcpus} vCPU, "
            f"{c.extra.get('start', '')} start in {c.extra.get('boot_s', 0):.2f} s)"
        )


@capsule.command("list")
@click.option("--json", "as_json", is_flag=True)
def capsule_list(as_json: bool) -> None:
    """List capsules and their states."""
    capsules = _run(_with_manager(lambda m: _async_value(m.list_capsules())))
    if as_json:
        click.echo(json.dumps([_capsule_dict(c) for c in capsules], indent=2))
        return
    if not capsules:
        click.echo("no capsules: `wrenn-tui capsule create`")
    for c in capsules:
        reason = f"  ({c.reason})" if c.reason else ""
        click.echo(
            f"{c.id}  {c.state.value:<8} {c.memory_mib:>5} MiB  {c.vcpus} vCPU  "
            f"gen {c.generation}{reason}"
        )


async def _async_value(value: Any) -> Any:
    return value


@capsule.command("get")
@click.argument("capsule_id")
@click.option("--json", "as_json", is_flag=True)
def capsule_get(capsule_id: str, as_json: bool) -> None:
    """Show one capsule, its snapshots and recent events."""
    from backend.capsules.errors import CapsuleError

    async def get(m: Any) -> Any:
        return m.get(capsule_id), m.snapshots(capsule_id), m.events(capsule_id, 20)

    try:
        c, snapshots, events = _run(_with_manager(get))
    except CapsuleError as exc:
        _fail(exc)
    if as_json:
        click.echo(
            json.dumps(
                {
                    **_capsule_dict(c),
                    "snapshots": [asdict(s) for s in snapshots],
                    "events": [asdict(e) for e in events],
                },
                indent=2,
            )
        )
        return
    for key, value in _capsule_dict(c).items():
        click.echo(f"{key:<14} {value}")
    for s in snapshots:
        click.echo(
            f"snapshot gen {s.generation}: {s.total_allocated / 2**20:.1f} MiB "
            f"({s.pause_seconds:.2f} s)"
        )
    for e in events:
        click.echo(f"event {e.kind:<10} {e.message}")


@capsule.command("pause")
@click.argument("capsule_id")
@click.option("--json", "as_json", is_flag=True)
def capsule_pause(capsule_id: str, as_json: bool) -> None:
    """Snapshot a running capsule to disk and stop its VM."""
    from backend.capsules.errors import CapsuleError

    try:
        s = _run(_with_manager(lambda m: m.pause(capsule_id)))
    except CapsuleError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(asdict(s), indent=2))
    else:
        click.echo(
            f"{capsule_id} paused: generation {s.generation}, "
            f"{s.total_allocated / 2**20:.1f} MiB on disk, {s.pause_seconds:.2f} s"
        )


@capsule.command("resume")
@click.argument("capsule_id")
@click.option("--json", "as_json", is_flag=True)
def capsule_resume(capsule_id: str, as_json: bool) -> None:
    """Resume a paused capsule from its snapshot."""
    from backend.capsules.errors import CapsuleError

    try:
        c = _run(_with_manager(lambda m: m.resume(capsule_id)))
    except CapsuleError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(_capsule_dict(c), indent=2))
    else:
        click.echo(f"{capsule_id} running (resumed in {c.extra.get('resume_s', 0):.2f} s)")


@capsule.command("destroy")
@click.argument("capsule_id")
def capsule_destroy(capsule_id: str) -> None:
    """Kill a capsule's VM and delete everything it had."""
    from backend.capsules.errors import CapsuleError

    try:
        _run(_with_manager(lambda m: m.destroy(capsule_id)))
    except CapsuleError as exc:
        _fail(exc)
    click.echo(f"{capsule_id} destroyed")


@capsule.command("fork")
@click.argument("capsule_id")
@click.option("--count", default=1, show_default=True, help="How many copies (1..16).")
@click.option("--json", "as_json", is_flag=True)
def capsule_fork(capsule_id: str, count: int, as_json: bool) -> None:
    """New capsules with the source's memory and disk at one instant; the source keeps running
    (or stays paused)."""
    from backend.capsules.errors import CapsuleError

    try:
        clones = _run(_with_manager(lambda m: m.fork(capsule_id, count)))
    except CapsuleError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([_capsule_dict(c) for c in clones], indent=2))
        return
    for c in clones:
        click.echo(f"{c.id} running (fork of {capsule_id} in {c.extra.get('boot_s', 0):.2f} s)")


@capsule.command("metrics")
@click.argument("capsule_id")
@click.option(
    "--range",
    "range_",
    type=click.Choice(["1m", "5m", "10m", "1h", "2h", "24h"]),
    default="5m",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True)
def capsule_metrics(capsule_id: str, range_: str, as_json: bool) -> None:
    """A capsule's metric history (plus 3 live samples when it is running)."""
    from backend.sampler.cli import metrics_command

    sys.exit(metrics_command(capsule_id, range_, as_json))


@capsule.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("capsule_id")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", default=60.0, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def capsule_exec(capsule_id: str, argv: tuple[str, ...], timeout: float, as_json: bool) -> None:
    """Run a command in a capsule: `wrenn-tui capsule exec ID -- sh -c 'echo hi'`."""
    import shlex

    from backend.capsules.errors import CapsuleError

    cmd = shlex.join(argv)
    try:
        result = _run(_with_manager(lambda m: m.exec(capsule_id, cmd, timeout=timeout)))
    except CapsuleError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(asdict(result), indent=2))
        sys.exit(result.exit_code)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    sys.stdout.flush()
    sys.exit(result.exit_code)


main.add_command(serve)
main.add_command(api_key)


# -- templates --------------------------------------------------------------------------------


@main.group()
def template() -> None:
    """Save capsules as templates, list and remove them (`capsule create --template NAME`)."""


def _template_dict(t: Any, users: list[str]) -> dict[str, Any]:
    data = asdict(t)
    data["capsules"] = users
    return data


@template.command("create")
@click.argument("capsule_id")
@click.option("--name", required=True, help="[a-z0-9][a-z0-9._-]{0,62}")
@click.option("--json", "as_json", is_flag=True)
def template_create(capsule_id: str, name: str, as_json: bool) -> None:
    """Save a running or paused capsule as a template (a running one keeps running)."""
    from backend.capsules.errors import CapsuleError

    try:
        t = _run(_with_manager(lambda m: m.template_create(capsule_id, name)))
    except CapsuleError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(_template_dict(t, []), indent=2))
    else:
        click.echo(
            f"template {t.name} saved from {capsule_id} ({t.allocated / 2**20:.1f} MiB, "
            f"{t.memory_mib} MiB RAM, {t.vcpus} vCPU): "
            f"`wrenn-tui capsule create --template {t.name}`"
        )


@template.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also the cached layers of recipe builds.")
@click.option("--json", "as_json", is_flag=True)
def template_list(show_all: bool, as_json: bool) -> None:
    """List the built-in (image) and saved templates."""

    async def listing(m: Any) -> Any:
        return [(t, m.template_users(t.name)) for t in m.list_templates(show_all)]

    rows = _run(_with_manager(listing))
    if as_json:
        click.echo(json.dumps([_template_dict(t, users) for t, users in rows], indent=2))
        return
    if not rows:
        click.echo("no templates: run `wrenn-tui image build`")
    for t, users in rows:
        size = "any size" if t.builtin else f"{t.memory_mib} MiB {t.vcpus} vCPU {t.network}"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created_at))
        kind = "image" if t.builtin else "layer" if t.hidden else "saved"
        click.echo(
            f"{t.name:<20} {kind:<6} {size:<24} "
            f"{t.allocated / 2**20:>8.1f} MiB  {created}  from {t.source}  "
            f"{len(users)} capsule(s)"
        )


@template.command("get")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def template_get(name: str, as_json: bool) -> None:
    """Show one template and the capsules that use it."""
    from backend.capsules.errors import CapsuleError

    async def get(m: Any) -> Any:
        return m.templates.get(name), m.template_users(name)

    try:
        t, users = _run(_with_manager(get))
    except CapsuleError as exc:
        _fail(exc)
    data = _template_dict(t, users)
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    for key, value in data.items():
        click.echo(f"{key:<12} {value}")


@template.command("rm")
@click.argument("name")
def template_rm(name: str) -> None:
    """Remove a saved template (refused while capsules use it)."""
    from backend.capsules.errors import CapsuleError

    try:
        _run(_with_manager(lambda m: m.template_remove(name)))
    except CapsuleError as exc:
        _fail(exc)
    click.echo(f"template {name} removed")


@template.command("build")
@click.argument("name")
@click.option(
    "-f",
    "--file",
    "recipe_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The recipe (Dockerfile syntax: FROM RUN COPY ENV WORKDIR USER START READY).",
)
@click.option(
    "--context",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where COPY reads from [default: the recipe's directory].",
)
@click.option("--no-cache", is_flag=True, help="Run every step, ignoring cached layers.")
@click.option("--json", "as_json", is_flag=True, help="Print the template as JSON at the end.")
def template_build(
    name: str, recipe_file: Path, context: Path | None, no_cache: bool, as_json: bool
) -> None:
    """Build template NAME from a recipe; each step's result is cached as a layer, so an
    unchanged rebuild does nothing and a changed step re-runs from there."""
    from backend.capsules.errors import CapsuleError
    from backend.recipes.builder import RecipeBuilder
    from backend.recipes.parser import RecipeError

    def progress(line: str) -> None:
        click.echo(click.style(f"=> {line}", bold=True), err=as_json)

    def output(line: str) -> None:
        click.echo(f"   {line}", err=as_json)

    async def build(m: Any) -> Any:
        builder = RecipeBuilder(m, progress=progress, output=output)
        return await builder.build(name, recipe_file, context, no_cache=no_cache)

    try:
        result = _run(_with_manager(build))
    except (CapsuleError, RecipeError) as exc:
        _fail(exc)
    if as_json:
        data = _template_dict(result.template, [])
        data.update(steps=result.steps, cached=result.cached, seconds=round(result.seconds, 3))
        click.echo(json.dumps(data, indent=2))


@template.command("prune")
def template_prune() -> None:
    """Remove the cached layers of recipe builds that no template was built from, and the
    imported OCI images (`oci-*`) no template or capsule builds on."""
    from backend.capsules.errors import CapsuleError
    from backend.recipes.builder import prune

    try:
        result = _run(_with_manager(prune))
    except CapsuleError as exc:
        _fail(exc)
    for name in result.removed:
        click.echo(f"removed {name}")
    for name in result.kept_in_use:
        click.echo(f"kept {name}: a capsule runs on it")
    images = sum(1 for name in result.removed if name.startswith("oci-"))
    layers = len(result.removed) - images
    click.echo(
        f"{layers} layer(s) and {images} imported image(s) removed, "
        f"{result.freed / 2**20:.1f} MiB freed"
    )


if __name__ == "__main__":
    main()
