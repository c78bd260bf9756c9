"""``wrenn-tui serve`` and ``wrenn-tui api-key`` (registered by backend/cli.py)."""

from __future__ import annotations

import sys

import click

from backend.config import default_paths

from . import DEFAULT_HOST, DEFAULT_PORT


def environment(url: str) -> str:
    """What to export; the key itself is never printed (terminal scrollback and logs keep
    it): the lines read it with `wrenn-tui api-key`."""
    return (
        "export E2B_API_KEY=$(wrenn-tui api-key)\n"
        f"export E2B_API_URL={url}\nexport E2B_SANDBOX_URL={url}\n"
        "export WRENN_API_KEY=$(wrenn-tui api-key)\n"
        f"export WRENN_BASE_URL={url}"
    )


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
def serve(host: str, port: int) -> None:
    """Serve the agent API: the unmodified E2B and Wrenn SDKs then drive capsules."""
    import asyncio

    from .keys import load_or_create_key

    paths = default_paths()
    key = load_or_create_key(paths)
    try:
        asyncio.run(_serve(host, port, key))
    except OSError as exc:
        click.echo(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", err=True)
        sys.exit(1)


async def _serve(host: str, port: int, key: str) -> None:
    import asyncio
    import signal

    from backend.capsules.manager import CapsuleManager
    from backend.sampler import ManagerSource, Sampler

    from .capsules import ManagerCapsules
    from .server import ApiServer

    manager = CapsuleManager(default_paths())
    await manager.start(watchdog=True)
    # Wrenn's metrics routes read its history (the dashboard runs its own).
    sampler = Sampler(ManagerSource(manager), store=manager.store)
    await sampler.start()
    server = ApiServer(ManagerCapsules(manager, sampler), key, host=host, port=port)
    try:
        await server.start()
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"wrenn-tui agent API on http://{shown}:{server.port} (Ctrl-C stops it)")
        click.echo(environment(f"http://{shown}:{server.port}"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(server.wait())
        await asyncio.wait(
            [waiter, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED"
        )
    finally:
        await server.stop()
        await sampler.stop()
        await manager.close()


@click.command("api-key")
@click.option("--rotate", is_flag=True, help="Replace the key (clients must use the new one).")
def api_key(rotate: bool) -> None:
    """Print the agent API key (made on first use; kept 0600 in the config dir)."""
    from .keys import load_or_create_key, rotate_key

    paths = default_paths()
    click.echo(rotate_key(paths) if rotate else load_or_create_key(paths))
