"""TerminalPane in a real (headless) Textual app, against a real envd on the host."""

from __future__ import annotations

import asyncio
import re
import time

from textual.command import CommandPalette
from textual.events import Paste

from backend.pty_client import ConnectionState, Output
from tests.terminal.conftest import (
    PaneApp,
    all_text,
    screen_text,
    type_line,
    wait_for,
    wait_for_text,
)
from tui.terminal import TerminalPane

PROMPT = "wrenn$"


def painted(pane: TerminalPane) -> list[str]:
    """What the widget paints (through its strip caches), row by row."""
    return [pane.render_line(y).text.rstrip() for y in range(pane.size.height)]


async def test_typed_command_output_appears_on_the_screen(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(100, 30)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await pilot.press(*"echo hel", "l", "o", "enter")
        await wait_for_text(pane, "\nhello")
        assert pane.tag == f"tui-{app.capsule_id}"
        assert (pane.emulator.cols, pane.emulator.rows) == (100, 30)
        await pilot.pause(0.1)
        assert "hello" in painted(pane)


async def test_ctrl_c_interrupts_a_running_program(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await pilot.press(*"sleep 100", "enter")
        await wait_for_text(pane, "sleep 100")
        await pilot.pause(0.3)
        await pilot.press("ctrl+c")
        took = await wait_for(
            lambda: re.search(r"\^C\n" + re.escape(PROMPT), screen_text(pane)), 5, "prompt"
        )
        assert took < 2, f"the prompt came back {took:.2f} s after ctrl+c"


async def test_resizing_the_app_resizes_the_remote_terminal(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await type_line(pane, "stty size")
        await wait_for_text(pane, "\n24 80")
        await pilot.resize_terminal(121, 37)
        await wait_for(lambda: pane.emulator.cols == 121, 3, "debounced resize")
        await type_line(pane, "clear; stty size")
        await wait_for_text(pane, "37 121")
        assert pane.emulator.rows == 37


async def test_a_flood_keeps_the_app_ticking_and_ends_fully_painted(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(100, 30)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        started = time.monotonic()
        await type_line(pane, "head -c 5000000 /dev/urandom | base64; echo FLOOD-$((1+1))")
        took = await wait_for_text(pane, "FLOOD-2", timeout=60)
        ticks = [tick for tick in app.ticks if started <= tick]
        assert len(ticks) >= int(took), f"{len(ticks)} ticks in {took:.1f} s of flood"
        stall = app.longest_stall(started)
        print(f"flood {took:.2f} s, {len(ticks)} ticks, longest stall {stall * 1000:.0f} ms")
        assert stall < 0.5, f"the app froze for {stall:.2f} s"
        assert pane.emulator.history_size == 2000
        await pilot.press(*"echo still-$((2+3))", "enter")
        await wait_for_text(pane, "still-5", timeout=3)
        await pilot.pause(0.2)
        # Every row drawn from the strip caches matches the emulator: no stale line.
        assert painted(pane) == [line.rstrip() for line in pane.emulator.display]


async def test_output_is_parsed_in_slices_that_keep_the_loop_running() -> None:
    """Colours on every line take pyte's slow path, where parsing (not the network) is the
    bottleneck: only slicing the work keeps keys and timers going."""
    app = PaneApp("http://127.0.0.1:9")  # nothing listens there; the pane keeps retrying
    async with app.run_test(size=(100, 30)):
        line = "".join(f"\x1b[3{n % 8}m{n:04}\x1b[0m " for n in range(18))
        text = (line + "\r\n") * 6000 + "THE-END"
        lags: list[float] = []

        async def monitor() -> None:
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.002)
                lags.append(time.monotonic() - before)

        watcher = asyncio.create_task(monitor())
        started = time.monotonic()
        await app.pane._feed(Output(text))
        took = time.monotonic() - started
        watcher.cancel()
        assert "THE-END" in screen_text(app.pane)
        assert took > 0.2, "too little work to tell"
        assert max(lags) < 0.25, f"the loop stalled {max(lags):.2f} s during a {took:.2f} s feed"


async def test_ctrl_c_reaches_a_flooding_program_at_once(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        started = time.monotonic()
        # SIGINT kills yes; the trap then says when that happened.
        await type_line(pane, "bash -c 'trap \"date +STOPPED-%s.%N; exit\" INT; yes'")
        await pilot.pause(1.5)
        pressed = time.time()
        await pilot.press("ctrl+c")
        await wait_for_text(pane, "STOPPED-", timeout=20)
        stopped = float(re.search(r"STOPPED-(\d+\.\d+)", screen_text(pane)).group(1))  # type: ignore[union-attr]
        assert stopped - pressed < 1.0, f"yes ran on for {stopped - pressed:.2f} s"
        flood = time.monotonic() - started
        ticks = [tick for tick in app.ticks if started <= tick]
        assert len(ticks) >= int(flood)
        stall = app.longest_stall(started)
        print(f"yes {flood:.2f} s, {len(ticks)} ticks, longest stall {stall * 1000:.0f} ms")
        assert stall < 0.5, f"the app froze for {stall:.2f} s"


async def test_the_pane_reattaches_after_the_socket_drops(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)):
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await type_line(pane, "export X=pane-kept; echo set-$((1+1))")
        await wait_for_text(pane, "\nset-2")
        pid = pane.client.pid if pane.client else None
        pane.drop_connection()
        await wait_for(lambda: pane.attach_count == 2, 10, "reattach")
        await wait_for(lambda: pane.connection_state == ConnectionState.CONNECTED, 5, "connected")
        await type_line(pane, "echo X=$X")
        await wait_for_text(pane, "\nX=pane-kept")
        assert pane.client is not None and pane.client.pid == pid
        # The replay redrew the screen instead of adding a second copy of it.
        assert all_text(pane).count("echo set-$((1+1))") == 1


async def test_paused_capsule_is_shown_and_the_pane_comes_back(envd_url: str, proxy) -> None:  # type: ignore[no-untyped-def]
    app = PaneApp(proxy.url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await proxy.pause()
        pane.set_paused(True)
        await wait_for(lambda: pane.connection_state == ConnectionState.PAUSED, 5, "paused")
        await pilot.pause(0.1)
        assert pane.status == "capsule paused — waiting to reattach…"
        assert "capsule paused — waiting to reattach…" in painted(pane)[-1]
        await proxy.resume()
        pane.set_paused(False)
        await wait_for(lambda: pane.attach_count == 2, 5, "reattach after resume")
        assert pane.status is None


async def test_reopened_pane_finds_the_same_shell(envd_url: str) -> None:
    first = PaneApp(envd_url)
    async with first.run_test(size=(80, 24)):
        await wait_for_text(first.pane, PROMPT)
        await type_line(first.pane, "export Y=reopened; echo set-$((1+2))")
        await wait_for_text(first.pane, "\nset-3")
        pid = first.pane.client.pid if first.pane.client else None
    second = PaneApp(envd_url, capsule_id=first.capsule_id)
    async with second.run_test(size=(80, 24)):
        await wait_for_text(second.pane, "set-3")
        await type_line(second.pane, "echo Y=$Y")
        await wait_for_text(second.pane, "\nY=reopened")
        assert second.pane.client is not None and second.pane.client.pid == pid


async def test_dashboard_keys_reach_the_shell_but_the_detach_key_does_not(
    envd_url: str,
) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await pilot.press(*"echo first-$((1+1))", "enter")
        await wait_for_text(pane, "\nfirst-2")
        # ctrl+p is the app's command palette, a priority binding: in the pane it is bash's
        # previous-history.
        await pilot.press("ctrl+p", "enter")
        await wait_for(lambda: screen_text(pane).count("\nfirst-2") == 2, 5, "history recall")
        assert not isinstance(app.screen, CommandPalette)
        await pilot.press("ctrl+right_square_bracket")
        await pilot.pause(0.1)
        assert [type(m) for m in app.messages] == [TerminalPane.Detached]
        await pilot.press("enter")
        await wait_for(lambda: screen_text(pane).count(PROMPT) >= 4, 5, "a fresh prompt")
        assert "^]" not in screen_text(pane)


async def test_scrollback_keys_scroll_and_typing_returns_to_the_bottom(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 12)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await type_line(pane, "seq 1 100")
        await wait_for_text(pane, "\n100\n")
        await pilot.press("shift+pageup")
        assert pane.scrolled_back == 11
        await pilot.pause(0.05)
        assert painted(pane)[-1] == "90"
        await pilot.press("shift+pagedown")
        assert pane.scrolled_back == 0
        await pilot.press("shift+pageup", "x")
        assert pane.scrolled_back == 0
        await pilot.pause(0.05)
        assert painted(pane)[-1].startswith(PROMPT)


async def test_paste_is_bracketed_only_when_the_program_asked(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await type_line(pane, "cat -v")
        await wait_for(lambda: not pane.emulator.bracketed_paste, 5, "readline let go")
        pane.post_message(Paste("plain\n"))
        await wait_for_text(pane, "\nplain\n")
        await pilot.press("ctrl+c")
        await type_line(pane, r"printf '\e[?2004h'; cat -v")
        await wait_for(lambda: pane.emulator.bracketed_paste, 5, "mode 2004 on")
        await pilot.pause(0.2)
        pane.post_message(Paste("fenced"))
        await pilot.press("enter")
        await wait_for_text(pane, "^[[200~fenced^[[201~")


async def test_exit_title_and_restart(envd_url: str) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await type_line(pane, r"printf '\e]0;pane-title\a'")
        await wait_for(lambda: app.messages, 5, "title message")
        assert isinstance(app.messages[0], TerminalPane.TitleChanged)
        assert app.messages[0].title == "pane-title"
        await type_line(pane, "exit 3")
        await wait_for(lambda: len(app.messages) == 2, 5, "exit message")
        exited = app.messages[1]
        assert isinstance(exited, TerminalPane.Exited) and exited.exit_code == 3
        assert pane.status is not None and "exited with code 3" in pane.status
        await pilot.press("enter")
        await wait_for(lambda: pane.attach_count == 2, 5, "a new shell")
        await wait_for_text(pane, PROMPT)
        assert pane.status is None


async def test_the_footer_shows_the_detach_key_and_no_binding_a_shell_needs(
    envd_url: str,
) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)):
        await wait_for_text(app.pane, PROMPT)
        active = app.screen.active_bindings
        assert active["ctrl+right_square_bracket"].binding.description == "Detach"
        assert active["ctrl+right_square_bracket"].binding.key_display == "ctrl+]"
        assert not {"tab", "shift+tab", "ctrl+c", "ctrl+p"} & set(active)


async def test_fullscreen_attach_lets_go_of_the_session_and_takes_it_back(
    envd_url: str,
) -> None:
    app = PaneApp(envd_url)
    async with app.run_test(size=(80, 24)) as pilot:
        pane = app.pane
        await wait_for_text(pane, PROMPT)
        await type_line(pane, "echo before-$((1+1))")
        await wait_for_text(pane, "\nbefore-2")
        # Headless there is no real terminal to hand over, but the pane still lets go of its
        # socket first and reattaches afterwards.
        assert await pane.attach_fullscreen() is None
        await wait_for(lambda: pane.attach_count == 2, 5, "reattach")
        await pilot.pause(0.1)
        assert pane.connection_state == ConnectionState.CONNECTED and pane.status is None
        await wait_for_text(pane, "before-2")
        await type_line(pane, "echo after-$((1+2))")
        await wait_for_text(pane, "\nafter-3")
