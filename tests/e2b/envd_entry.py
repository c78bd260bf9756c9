"""``python -m tests.e2b.envd_entry [envd args]``: envd with the Connect façade mounted.

The real envd mounts it in backend/envd/app.py; until that line is applied this entry adds
the same routes, so the host tests exercise exactly the code the guest runs.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from backend.envd import connect
from backend.envd.__main__ import config_from_args
from backend.envd.app import create_app
from backend.envd.service import Envd


def main(argv: list[str] | None = None) -> int:
    config, level = config_from_args(argv)
    logging.basicConfig(level=level.upper(), stream=sys.stderr)
    envd = Envd(config)
    app = create_app(envd)
    if not any(getattr(r, "path", "").startswith("/process.Process") for r in app.routes):
        app.router.routes.extend(connect.routes(envd))
    uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="asyncio",
            http="h11",
            ws="websockets-sansio",
            lifespan="on",
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
        )
    ).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
