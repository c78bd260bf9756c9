"""The `wrenn-tui` entry point: the dashboard when run alone, else a headless subcommand."""

from __future__ import annotations

import click

from backend.cli import main as headless


@click.group(invoke_without_command=True, help=headless.help)
@click.pass_context
def main(ctx: click.Context) -> None:
    if ctx.invoked_subcommand is None:
        from tui.app import run_dashboard

        run_dashboard()


for _name, _command in headless.commands.items():
    main.add_command(_command, _name)
