"""WebSocket /tcp?port=N: one TCP connection to 127.0.0.1:N inside the capsule, its bytes
carried both ways as binary messages. The host's port proxy (``{port}-{id}.<host>`` URLs of
Wrenn's API) rides on it: a capsule with no network still serves its own ports this way,
and only the holder of the capsule's token reaches them."""

from __future__ import annotations

import asyncio
import contextlib

from starlette.websockets import WebSocket, WebSocketDisconnect

from .protocol import ENVD_PORT

READ_SIZE = 64 * 1024
CLOSE_REFUSED = 4404
"""Close code: nothing listens on that port (the reason says which)."""
CLOSE_INVALID = 4400


async def tcp_tunnel(ws: WebSocket) -> None:
    await ws.accept()
    raw = ws.query_params.get("port", "")
    port = int(raw) if raw.isdigit() else 0
    if not 1 <= port <= 65535 or port == ENVD_PORT:
        await ws.close(CLOSE_INVALID, f"port must be 1..65535 and not envd's own, not {raw!r}")
        return
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        await ws.close(CLOSE_REFUSED, f"nothing answers on port {port}: {exc.strerror or exc}")
        return

    async def upstream() -> None:
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                data = await ws.receive_bytes()
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(OSError):
            writer.write_eof()

    async def downstream() -> None:
        while data := await reader.read(READ_SIZE):
            await ws.send_bytes(data)

    tasks = {asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())}
    try:
        # the connection ends when the program closes it (downstream ends) or the host leaves
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            with contextlib.suppress(Exception):
                task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        with contextlib.suppress(Exception):
            await ws.close()
