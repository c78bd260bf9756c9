"""``python -m backend.envd``: parse the command line and serve until SIGTERM."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import DEFAULT_PORT, Config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="envd", description="wrenn guest agent")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--root",
        type=Path,
        help="host mode: serve files under DIR as if it were /, write metadata to "
        "DIR/run/wrenn, and only pretend to set the clock or drop caches",
    )
    p.add_argument("--metadata", help="metadata source: tcp:HOST:PORT or file:PATH")
    p.add_argument("--metadata-interval", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--reclaim-interval", type=float, default=2.0, metavar="SECONDS")
    p.add_argument(
        "--reclaim-threshold",
        type=float,
        default=80.0,
        metavar="PERCENT",
        help="drop the page cache when (total - available) / total reaches this (default 80)",
    )
    p.add_argument(
        "--ping-interval",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help='how often /pty sends {"type": "ping"} (default 30)',
    )
    p.add_argument("--snapshot-hold-timeout", type=float, default=600.0, metavar="SECONDS")
    p.add_argument("--proc", type=Path, default=Path("/proc"), help=argparse.SUPPRESS)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def config_from_args(argv: list[str] | None = None) -> tuple[Config, str]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.reclaim_threshold <= 100:
        parser.error("--reclaim-threshold is a percentage in (0, 100]")
    for name in ("metadata_interval", "reclaim_interval", "ping_interval"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.metadata:
        from .metadata import parse_source

        try:
            parse_source(args.metadata)
        except ValueError as exc:
            parser.error(str(exc))
    root = args.root
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        root = root.resolve()
    return Config(
        host=args.host,
        port=args.port,
        root=root,
        metadata=args.metadata,
        metadata_interval=args.metadata_interval,
        reclaim_interval=args.reclaim_interval,
        reclaim_threshold=args.reclaim_threshold,
        ping_interval=args.ping_interval,
        snapshot_hold_timeout=args.snapshot_hold_timeout,
        proc_path=args.proc,
    ), args.log_level


def main(argv: list[str] | None = None) -> int:
    config, level = config_from_args(argv)
    # In a capsule this is the serial console, which the host keeps and the dashboard shows
    # in a narrow pane: the time of day and the level's initial, then what happened.
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    import uvicorn

    from .app import create_app
    from .server import QuietServer
    from .service import Envd

    server = QuietServer(
        uvicorn.Config(
            create_app(Envd(config)),
            host=config.host,
            port=config.port,
            # Pinned implementations: "auto" would probe for optional C extensions at start-up.
            loop="asyncio",
            http="h11",
            ws="websockets-sansio",
            lifespan="on",
            # On an emulated guest CPU compressing terminal output costs more time than
            # sending it uncompressed over the virtual NIC.
            ws_per_message_deflate=False,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=3,
        )
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
