"""TerminalPane: a shell in a capsule, as a Textual widget.

The pane joins the emulator (tui/terminal/emulator.py) to the transport
(backend/pty_client.py). Output is parsed as it arrives, in slices that give the event loop
back every few milliseconds, so a flood never stalls the dashboard or the keyboard; the screen
is painted on a frame tick, only the rows that changed, and less often while a flood lasts
(its final state is always painted). Keys go out the moment they are pressed, on their own
path, never behind output.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.app import SuspendNotSupported
from textual.binding import Binding, BindingType
from textual.geometry import Region
from textual.message import Message
from textual.strip import Strip
from textual.timer import Timer
from textual.widget import Widget

from backend.pty_client import (
    Attached,
    ConnectionState,
    Exited,
    Output,
    PtyClient,
    RequestFailed,
    StateChanged,
)
from tui.terminal.attach import AttachError, AttachResult, attach_fullscreen
from tui.terminal.emulator import TerminalEmulator
from tui.terminal.keys import key_to_text, paste_text
from tui.terminal.sessions import session_tag

log = logging.getLogger("wrenn.tui.terminal")

DETACH_KEY = "ctrl+right_square_bracket"
# Left to the dashboard even while the pane has focus: quitting must always be possible.
UNCONSUMED_KEYS = frozenset({DETACH_KEY, "ctrl+q"})

FRAME_INTERVAL = 1 / 60
FLOOD_FRAME_INTERVAL = 1 / 10
FLOOD_CHARS = 32 * 1024
"""More output than this within one frame makes the next frame wait FLOOD_FRAME_INTERVAL:
painting then costs the parser little, and nobody reads a flood at 60 fps anyway."""
FEED_BUDGET_S = 0.008
"""Parse at most this long before giving the event loop back (keys, timers, other widgets)."""
MIN_FEED_SLICE = 1024
MAX_FEED_SLICE = 64 * 1024
"""Output is parsed in slices sized to take about FEED_BUDGET_S / 4: plain lines parse at
megabytes per second, colourful output a hundred times slower."""
RESIZE_DEBOUNCE_S = 0.1
WHEEL_LINES = 3

STATUS_TEXT = {
    ConnectionState.CONNECTING: "connecting…",
    ConnectionState.RECONNECTING: "connection lost — reattaching…",
    ConnectionState.DISCONNECTED: "capsule paused — waiting to reattach…",
    ConnectionState.PAUSED: "capsule paused — waiting to reattach…",
}


class TerminalPane(Widget, can_focus=True):
    """A shell in capsule ``capsule_id``, reached through its envd at ``envd_url``.

    On mount it reattaches to the session ``tag`` (default: :func:`session_tag` of the
    capsule), or starts the shell if there is none, and from then on keeps it attached across
    dropped connections and capsule pauses. Keys go to the shell except ctrl+] (detach:
    posts :class:`TerminalPane.Detached`) and ctrl+q (left to the app). shift+pageup/pagedown
    and the mouse wheel scroll back; typing returns to the bottom.
    """

    DEFAULT_CSS = """
    TerminalPane {
        width: 1fr;
        height: 1fr;
        background: $background;
        color: $foreground;
    }
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding(DETACH_KEY, "detach", "Detach", key_display="ctrl+]", priority=True),
        Binding("shift+pageup", "scroll_back", "Scroll back", show=False, priority=True),
        Binding("shift+pagedown", "scroll_forward", "Scroll fwd", show=False, priority=True),
    ]

    class Detached(Message):
        """The user pressed the detach key: focus should go back to the dashboard."""

        def __init__(self, pane: TerminalPane) -> None:
            super().__init__()
            self.pane = pane

        @property
        def control(self) -> TerminalPane:
            return self.pane

    class Exited(Message):
        """The shell (or program) ended; enter in the pane starts a new one."""

        def __init__(self, pane: TerminalPane, exit_code: int | None, signal: str | None) -> None:
            super().__init__()
            self.pane = pane
            self.exit_code = exit_code
            self.signal = signal

        @property
        def control(self) -> TerminalPane:
            return self.pane

    class TitleChanged(Message):
        """The program set the terminal title (OSC 0/2)."""

        def __init__(self, pane: TerminalPane, title: str) -> None:
            super().__init__()
            self.pane = pane
            self.title = title

        @property
        def control(self) -> TerminalPane:
            return self.pane

    class ConnectionChanged(Message):
        """The link to the session changed (connected, reconnecting, paused, closed...)."""

        def __init__(self, pane: TerminalPane, state: ConnectionState, reason: str) -> None:
            super().__init__()
            self.pane = pane
            self.state = state
            self.reason = reason

        @property
        def control(self) -> TerminalPane:
            return self.pane

    def __init__(
        self,
        capsule_id: str,
        envd_url: str,
        token: str | None,
        tag: str | None = None,
        *,
        cmd: str | None = None,
        args: list[str] | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        scrollback: int = 2000,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.capsule_id = capsule_id
        self.envd_url = envd_url
        self.token = token
        self._requested_tag = tag or session_tag(capsule_id)
        self._cmd, self._args, self._env, self._cwd = cmd, args, env, cwd
        self.emulator = TerminalEmulator(80, 24, scrollback)
        self.client: PtyClient | None = None
        self.connection_state = ConnectionState.CONNECTING
        self.connection_reason = ""
        self.exit_status: tuple[int | None, str | None] | None = None
        self.attach_count = 0
        """How many times the pane has attached to its session (reattaches included)."""
        self._paused = False
        self._scrollback_offset = 0
        self._row_strips: dict[int, Strip] = {}
        self._history_strips: dict[int, Strip] = {}
        self._strip_width = 0
        self._painted_cursor: tuple[int, int, bool] = (-1, -1, False)
        self._painted_history = 0
        self._painted_title = ""
        self._paint_pending: asyncio.TimerHandle | None = None
        self._next_paint_at = 0.0
        self._fed_since_paint = 0
        self._slice_started = 0.0
        self._feed_slice = 16 * 1024
        self._resize_timer: Timer | None = None

    # -- public API ------------------------------------------------------------------------

    @property
    def tag(self) -> str:
        """The envd session tag (the same shell for as long as it lives)."""
        if self.client is not None and self.client.tag:
            return self.client.tag
        return self._requested_tag

    @property
    def status(self) -> str | None:
        """The line shown over the pane when the shell is not simply running."""
        if self.exit_status is not None:
            code, signal = self.exit_status
            how = f"killed by {signal}" if signal else f"exited with code {code}"
            return f"shell {how} — enter: new shell · ctrl+]: leave"
        if self.connection_state == ConnectionState.CLOSED:
            return f"disconnected: {self.connection_reason or 'closed'}"
        return STATUS_TEXT.get(self.connection_state)

    @property
    def scrolled_back(self) -> int:
        """Lines scrolled back from the bottom (0: following the output)."""
        return self._scrollback_offset

    def set_paused(self, paused: bool) -> None:
        """Tell the pane its capsule was paused (True) or resumed (False)."""
        self._paused = paused
        if self.client is not None:
            self.client.set_paused(paused)

    async def restart(self) -> None:
        """Start a new shell under the same tag after the last one exited."""
        if self.client is None:
            return
        exit_status, self.exit_status = self.exit_status, None
        try:
            await self.client.restart()
        except Exception as exc:
            self.exit_status = exit_status
            log.warning("could not restart the shell in %s: %s", self.capsule_id, exc)
            self.notify(f"Could not start a new shell: {exc}", severity="error")
        self.refresh()

    async def send(self, data: bytes | str) -> None:
        """Type ``data`` into the shell, as the keyboard does."""
        if self.client is not None:
            await self.client.send_input(data)

    def drop_connection(self) -> None:
        """Cut the socket under the session, as a paused capsule does (the pane reattaches)."""
        if self.client is not None:
            self.client.drop_connection()

    async def close(self) -> None:
        """Let go of the session (it keeps running in the capsule)."""
        if self.client is not None:
            await self.client.close()

    async def attach_fullscreen(self) -> AttachResult | None:
        """Hand the session to the real terminal (blocking, inside ``App.suspend()``) until
        ctrl+], exit or disconnect, then take it back; None when the attach failed (the
        user was notified)."""
        self._requested_tag = self.tag
        client, self.client = self.client, None
        if client is not None:
            # A pane that stops reading while the loop is blocked would make envd hold the
            # session's output back: let go, and reattach afterwards (the replay redraws).
            await client.close()
        result: AttachResult | None = None
        try:
            with self.app.suspend():
                result = attach_fullscreen(
                    self.envd_url,
                    self.token,
                    self._requested_tag,
                    cmd=self._cmd,
                    args=self._args,
                    env=self._env,
                )
        except AttachError as exc:
            log.warning("full-screen attach to %s failed: %s", self._requested_tag, exc)
            self.notify(str(exc), title="Attach failed", severity="error")
        except SuspendNotSupported:
            self.notify("Full-screen attach needs a real terminal.", severity="warning")
        finally:
            self._connect()
        return result

    # -- lifecycle -------------------------------------------------------------------------

    def on_mount(self) -> None:
        if self.size.area:
            self._connect()

    async def on_unmount(self) -> None:
        if self._paint_pending is not None:
            self._paint_pending.cancel()
        await self.close()

    def _connect(self) -> None:
        if self.client is not None:
            return
        cols, rows = self._terminal_size()
        self.emulator.resize(cols, rows)
        self.client = PtyClient(
            self.envd_url,
            self.token,
            tag=self._requested_tag,
            cmd=self._cmd,
            args=self._args,
            env=self._env,
            cwd=self._cwd,
            cols=cols,
            rows=rows,
        )
        if self._paused:
            self.client.set_paused(True)
        self.run_worker(self._pump(self.client), name="pty", group="pty", exit_on_error=False)

    def _terminal_size(self) -> tuple[int, int]:
        return max(1, self.size.width), max(1, self.size.height)

    async def _pump(self, client: PtyClient) -> None:
        try:
            await self._consume(client)
        except Exception as exc:
            log.exception("terminal %s failed", self.tag)
            self.connection_state, self.connection_reason = ConnectionState.CLOSED, str(exc)
            self.notify(f"Terminal failed: {exc}", severity="error")
            self.refresh()

    async def _consume(self, client: PtyClient) -> None:
        async for event in client.events():
            if client is not self.client:
                return  # replaced (full-screen attach): its last words are stale
            if isinstance(event, Output):
                await self._feed(event)
            elif isinstance(event, Attached):
                self._on_attached(event)
            elif isinstance(event, Exited):
                self.exit_status = (event.exit_code, event.signal)
                self.post_message(self.Exited(self, event.exit_code, event.signal))
                self._schedule_paint()
                self.refresh()
            elif isinstance(event, StateChanged):
                self.connection_state, self.connection_reason = event.state, event.reason
                self.post_message(self.ConnectionChanged(self, event.state, event.reason))
                self.refresh()
            elif isinstance(event, RequestFailed):
                log.warning("terminal %s: %s (%s)", self.tag, event.message, event.code)
                if event.request in (None, "start", "connect"):
                    self.notify(f"Terminal: {event.message}", severity="error")

    def _on_attached(self, event: Attached) -> None:
        # The replay that follows redraws the session from envd's recent output: drawing it
        # over the old screen would show everything twice.
        self.emulator.reset()
        self.exit_status = None if event.alive else self.exit_status
        self.attach_count += 1
        self._scrollback_offset = 0
        self._forget_strips()
        self._schedule_paint()

    async def _feed(self, event: Output) -> None:
        data = event.data
        emulator = self.emulator
        start = 0
        while start < len(data):
            chunk = data[start : start + self._feed_slice]
            start += len(chunk)
            began = time.monotonic()
            emulator.feed(chunk)
            spent = time.monotonic() - began
            if spent > FEED_BUDGET_S / 2:
                self._feed_slice = max(MIN_FEED_SLICE, self._feed_slice // 2)
            elif spent < FEED_BUDGET_S / 8 and len(chunk) == self._feed_slice:
                self._feed_slice = min(MAX_FEED_SLICE, self._feed_slice * 2)
            self._fed_since_paint += len(chunk)
            replies = emulator.take_replies()
            # Answers to queries inside a replay were given long ago, to the original query.
            if replies and not event.replay and self.client is not None:
                await self.client.send_input(replies)
            self._schedule_paint()
            if time.monotonic() - self._slice_started > FEED_BUDGET_S:
                await asyncio.sleep(0)
                self._slice_started = time.monotonic()

    # -- painting --------------------------------------------------------------------------

    def _schedule_paint(self) -> None:
        if self._paint_pending is None:
            delay = max(0.0, self._next_paint_at - time.monotonic())
            # Not a Textual timer: a one-shot timer that starts late skips its only tick.
            self._paint_pending = asyncio.get_running_loop().call_later(
                delay, self.call_later, self._paint
            )

    def _forget_strips(self) -> None:
        self._row_strips.clear()
        self._history_strips.clear()
        self.emulator.take_dirty()
        self.refresh()

    def _paint(self) -> None:
        self._paint_pending = None
        flooded = self._fed_since_paint > FLOOD_CHARS
        self._fed_since_paint = 0
        self._next_paint_at = time.monotonic() + (
            FLOOD_FRAME_INTERVAL if flooded else FRAME_INTERVAL
        )
        emulator = self.emulator
        dirty = emulator.take_dirty()
        x, y = emulator.cursor
        cursor = (x, y, emulator.cursor_visible)
        if cursor != self._painted_cursor:
            dirty.update({self._painted_cursor[1], y})
            self._painted_cursor = cursor
        for row in dirty:
            self._row_strips.pop(row, None)
        if emulator.title != self._painted_title:
            self._painted_title = emulator.title
            self.post_message(self.TitleChanged(self, emulator.title))
        pushed = emulator.history_pushed
        if pushed != self._painted_history:
            if self._scrollback_offset:
                # Keep the lines being read in place while output goes on below.
                self._scrollback_offset = min(
                    self._scrollback_offset + pushed - self._painted_history,
                    emulator.history_size,
                )
            self._painted_history = pushed
            self.refresh()
            return
        top = self._top_line()
        height = self.size.height
        regions = [
            Region(0, line, self.size.width, 1)
            for row in sorted(dirty)
            if 0 <= (line := emulator.history_size + row - top) < height
        ]
        if regions:
            self.refresh(*regions)

    def _top_line(self) -> int:
        """The content line shown on the pane's first row."""
        bottom_top = max(0, self.emulator.content_height - self.size.height)
        return max(0, bottom_top - self._scrollback_offset)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        base = self.rich_style
        if width != self._strip_width or base != self.emulator.painter.base:
            self._strip_width = width
            self.emulator.painter.set_base(base)
            self._row_strips.clear()
            self._history_strips.clear()
        status = self.status
        if status is not None and y == self.size.height - 1:
            return self._status_strip(status, width, base)
        emulator = self.emulator
        content_y = self._top_line() + y
        history_size = emulator.history_size
        if content_y < history_size:
            key = emulator.history_pushed - history_size + content_y
            strip = self._history_strips.get(key)
            if strip is None:
                if len(self._history_strips) > 4 * max(1, self.size.height):
                    self._history_strips.clear()
                strip = self._history_strips[key] = emulator.paint(content_y, width)
            return strip
        row = content_y - history_size
        if row == emulator.cursor[1] and self.has_focus and emulator.cursor_visible:
            return emulator.paint(content_y, width, show_cursor=True)
        strip = self._row_strips.get(row)
        if strip is None:
            strip = self._row_strips[row] = emulator.paint(content_y, width)
        return strip

    def _status_strip(self, text: str, width: int, base: Style) -> Strip:
        label = f" {text} "[:width]
        left = max(0, (width - len(label)) // 2)
        segments = [
            Segment(" " * left, base),
            Segment(label, base + Style(reverse=True, bold=True)),
        ]
        return Strip(segments).adjust_cell_length(width, base)

    # -- input -----------------------------------------------------------------------------

    def check_consume_key(self, key: str, character: str | None) -> bool:
        # Keys a shell would receive must not trigger the dashboard's bindings (tab, escape,
        # ctrl+p...) while the pane has focus.
        if key in UNCONSUMED_KEYS:
            return False
        return key_to_text(key, character) is not None

    async def on_key(self, event: events.Key) -> None:
        text = key_to_text(event.key, event.character, app_cursor=self.emulator.app_cursor)
        if text is None or event.key in UNCONSUMED_KEYS:
            return
        event.stop()
        event.prevent_default()
        if self.exit_status is not None:
            if event.key == "enter":
                await self.restart()
            return
        self._follow_output()
        await self.send(text)

    async def on_paste(self, event: events.Paste) -> None:
        event.stop()
        if self.exit_status is not None:
            return
        self._follow_output()
        await self.send(paste_text(event.text, bracketed=self.emulator.bracketed_paste))

    def _follow_output(self) -> None:
        if self._scrollback_offset:
            self._scrollback_offset = 0
            self.refresh()

    def _scroll_by(self, lines: int) -> None:
        offset = max(0, min(self.emulator.history_size, self._scrollback_offset + lines))
        if offset != self._scrollback_offset:
            self._scrollback_offset = offset
            self.refresh()

    def action_scroll_back(self) -> None:
        self._scroll_by(max(1, self.size.height - 1))

    def action_scroll_forward(self) -> None:
        self._scroll_by(-max(1, self.size.height - 1))

    def action_detach(self) -> None:
        self.post_message(self.Detached(self))

    def on_mouse_scroll_up(self, event: events.MouseScrollUp) -> None:
        event.stop()
        self._scroll_by(WHEEL_LINES)

    def on_mouse_scroll_down(self, event: events.MouseScrollDown) -> None:
        event.stop()
        self._scroll_by(-WHEEL_LINES)

    def on_focus(self) -> None:
        self._refresh_cursor_row()

    def on_blur(self) -> None:
        self._refresh_cursor_row()

    def _refresh_cursor_row(self) -> None:
        self._painted_cursor = (-1, -1, False)
        self._schedule_paint()

    # -- size ------------------------------------------------------------------------------

    def on_resize(self, event: events.Resize) -> None:
        if self.client is None:
            if self.size.area:
                self._connect()
            return
        self.refresh()
        if self._resize_timer is not None:
            self._resize_timer.stop()
        self._resize_timer = self.set_timer(RESIZE_DEBOUNCE_S, self._apply_size)

    async def _apply_size(self) -> None:
        self._resize_timer = None
        if not self.size.area:
            return  # hidden: a 1x1 terminal would garble whatever runs meanwhile
        cols, rows = self._terminal_size()
        if (cols, rows) == (self.emulator.cols, self.emulator.rows):
            return
        self.emulator.resize(cols, rows)
        self._forget_strips()
        self._schedule_paint()
        if self.client is not None:
            await self.client.resize(cols, rows)
