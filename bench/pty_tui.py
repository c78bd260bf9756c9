"""Benchmark the terminal pane: ``python -m bench.pty_tui`` prints one JSON object.

A real envd runs in host mode (pinned to one core, this process to the others, as a capsule's
envd would be on its own vCPU). A headless Textual app holds only a ``TerminalPane`` and a 1 s
timer. Measured:

- ``pty_5mb_s``: ``head -c 5000000 /dev/urandom | base64`` in the pane, from sending the
  command until the widget paints the final screen (its strips show the end marker).
  ``pty_5mb_transport_s`` is the same flood through ``PtyClient`` and the emulator alone, no
  widget and no app: the pane's own cost is the difference.
- ``ticks_during_pty`` / ``ticks_expected``: how many 1 s timer ticks fired during the flood,
  against its duration in whole seconds.
- ``ticks_during_yes`` / ``ticks_expected_yes``: the same during 8 s of ``yes`` (the worst
  case: a line per two bytes), then ``yes_ctrl_c_to_prompt_s``: from ctrl+c until the pane
  paints the prompt again (everything already buffered on the way must be drawn first).
- ``echo_p50_ms`` / ``echo_p99_ms``: a key event posted to the app (as its driver would) while
  ``cat`` runs, until the echoed character is on the pane emulator's screen.
  ``transport_echo_*`` is the same through ``PtyClient`` without Textual.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from textual import events
from textual.app import App, ComposeResult

from backend.pty_client import Attached, Output, PtyClient
from bench.envd import ms, percentile, pinned, running_envd
from tui.terminal import TerminalPane
from tui.terminal.emulator import TerminalEmulator

SHELL: dict[str, Any] = {
    "cmd": "/bin/bash",
    "args": ["--norc", "--noprofile"],
    "env": {"PS1": "bench$ "},
}
FLOOD = "head -c 5000000 /dev/urandom | base64; echo FLOOD-$((1+1))"
MARKER = "FLOOD-2"
ECHO_SAMPLES = 200
YES_SECONDS = 8.0
SIZE = (120, 40)


class BenchApp(App[None]):
    def __init__(self, envd_url: str, capsule_id: str) -> None:
        super().__init__()
        self.envd_url = envd_url
        self.capsule_id = capsule_id
        self.ticks: list[float] = []

    def compose(self) -> ComposeResult:
        yield TerminalPane(self.capsule_id, self.envd_url, None, **SHELL)

    def on_mount(self) -> None:
        self.set_interval(1.0, lambda: self.ticks.append(time.monotonic()))
        self.query_one(TerminalPane).focus()


async def until(predicate: Any, timeout: float, what: str, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(poll)


def painted(pane: TerminalPane) -> str:
    return "\n".join(pane.render_line(y).text for y in range(pane.size.height))


async def pane_figures(envd_url: str) -> dict[str, Any]:
    app = BenchApp(envd_url, "cl-bench-pane")
    async with app.run_test(size=SIZE) as pilot:
        pane = app.query_one(TerminalPane)
        await until(lambda: "bench$" in painted(pane), 10, "the prompt")

        started = time.monotonic()
        await pane.send(FLOOD + "\r")
        await until(lambda: MARKER in painted(pane), 300, "the flood's end", poll=0.01)
        flood_s = time.monotonic() - started
        ticks = [tick for tick in app.ticks if tick >= started]

        await pane.send("clear; yes\r")
        started = time.monotonic()
        await asyncio.sleep(YES_SECONDS)
        yes_ticks = [tick for tick in app.ticks if tick >= started]
        interrupted = time.monotonic()
        await pilot.press("ctrl+c")
        await until(
            lambda: "^C" in painted(pane) and painted(pane).rstrip().endswith("bench$"),
            60,
            "the prompt after ctrl+c",
            poll=0.01,
        )
        ctrl_c_to_prompt_s = time.monotonic() - interrupted

        await pane.send("clear; cat\r")
        await until(lambda: "cat" not in "".join(pane.emulator.display), 10, "cat")
        await asyncio.sleep(0.3)
        latencies = []
        for n in range(ECHO_SAMPLES):
            if n and n % 60 == 0:
                await pilot.press("enter")
                await until(lambda: pane.emulator.cursor[0] == 0, 5, "a new line")
                await asyncio.sleep(0.05)
            x = pane.emulator.cursor[0]
            char = "abcdefghij"[n % 10]
            sent = time.perf_counter()
            # As the driver delivers a key: pilot.press would also wait for a screen refresh.
            app.post_message(events.Key(char, char))
            await until(lambda x=x: pane.emulator.cursor[0] > x, 5, "the echo", poll=0.0005)
            latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(0.01)
        await pilot.press("ctrl+c")
    return {
        "pty_5mb_s": round(flood_s, 3),
        "ticks_during_pty": len(ticks),
        "ticks_expected": int(flood_s),
        "ticks_during_yes": len(yes_ticks),
        "ticks_expected_yes": int(YES_SECONDS),
        "yes_ctrl_c_to_prompt_s": round(ctrl_c_to_prompt_s, 3),
        "echo_p50_ms": ms(percentile(latencies, 50)),
        "echo_p99_ms": ms(percentile(latencies, 99)),
    }


async def transport_figures(envd_url: str) -> dict[str, Any]:
    client = PtyClient(envd_url, None, tag="bench-transport", cols=SIZE[0], rows=SIZE[1], **SHELL)
    emulator = TerminalEmulator(*SIZE)
    attached = asyncio.Event()

    async def consume() -> None:
        async for event in client.events():
            if isinstance(event, Attached):
                attached.set()
            elif isinstance(event, Output):
                emulator.feed(event.data)

    consumer = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(attached.wait(), 10)
        await until(lambda: "bench$" in "".join(emulator.display), 10, "the prompt")
        started = time.monotonic()
        await client.send_input(FLOOD + "\r")
        await until(lambda: MARKER in "".join(emulator.display), 300, "the flood's end")
        flood_s = time.monotonic() - started

        await client.send_input("clear; cat\r")
        await asyncio.sleep(0.5)
        latencies = []
        for n in range(ECHO_SAMPLES):
            if n and n % 60 == 0:
                await client.send_input("\r")
                await until(lambda: emulator.cursor[0] == 0, 5, "a new line")
            x = emulator.cursor[0]
            sent = time.perf_counter()
            await client.send_input("abcdefghij"[n % 10])
            await until(lambda x=x: emulator.cursor[0] > x, 5, "the echo", poll=0.0002)
            latencies.append(time.perf_counter() - sent)
            await asyncio.sleep(0.01)
        await client.kill()
    finally:
        await client.close()
        consumer.cancel()
    return {
        "pty_5mb_transport_s": round(flood_s, 3),
        "transport_echo_p50_ms": ms(percentile(latencies, 50)),
        "transport_echo_p99_ms": ms(percentile(latencies, 99)),
    }


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="bench-pty-tui-") as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        with running_envd(root) as (proc, url, _), pinned(proc.pid) as was_pinned:
            result: dict[str, Any] = {}
            result.update(asyncio.run(pane_figures(url)))
            result.update(asyncio.run(transport_figures(url)))
            result["pinned"] = was_pinned
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
