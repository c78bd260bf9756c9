"""The terminal emulator: pyte's screen model, plus what a shell pane needs and pyte lacks.

:class:`TerminalScreen` extends ``pyte.Screen`` with scrollback, the alternate screen (full-screen
programs leave the shell's screen as they found it), an xterm-like resize (the cursor row stays
visible; lines pushed off the top go to the scrollback) and a fast path for plain ASCII text.
:class:`TerminalEmulator` wraps it for a widget: feed text, take the dirty rows, read the modes
that change what keys send, and paint rows as Textual strips.

Rows are addressed in *content* coordinates: ``0 .. history_size - 1`` are scrollback lines,
oldest first, and ``history_size + y`` is screen row ``y``.
"""

from __future__ import annotations

import copy
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

import pyte
from pyte import charsets, modes
from pyte.screens import Char, Cursor, Margins, StaticDefaultDict
from rich.color import Color
from rich.segment import Segment
from rich.style import Style
from textual.strip import Strip

Line = StaticDefaultDict[int, Char]

# pyte keeps private (DEC) modes shifted left by 5 to tell them apart from ANSI modes.
APP_CURSOR_MODE = 1 << 5
BRACKETED_PASTE_MODE = 2004 << 5
ALTERNATE_SCREEN_MODES = frozenset({47, 1047, 1049})

ANSI_COLOR_NUMBERS = {
    "black": 0,
    "red": 1,
    "green": 2,
    "brown": 3,
    "yellow": 3,
    "blue": 4,
    "magenta": 5,
    "cyan": 6,
    "white": 7,
}
MAX_GLYPH_TABLES = 256


class _GlyphTable(dict[str, Char]):
    """The cells for one set of attributes, one per character: plain text then costs a dict
    lookup per character instead of building a new ``Char``."""

    def __init__(self, attrs: Char) -> None:
        super().__init__()
        self.attrs = attrs

    def __missing__(self, data: str) -> Char:
        glyph = self[data] = self.attrs._replace(data=data)
        return glyph


@dataclass
class _SavedScreen:
    buffer: dict[int, Line]
    cursor: Cursor
    margins: Margins | None


class TerminalScreen(pyte.Screen):
    def __init__(self, columns: int, lines: int, scrollback: int = 2000) -> None:
        # pyte's constructor calls reset(), which uses these.
        self.history: deque[Line] = deque(maxlen=scrollback)
        self.history_pushed = 0
        self.main_screen: _SavedScreen | None = None
        self.replies: list[str] = []
        self._glyphs: dict[Char, _GlyphTable] = {}
        super().__init__(columns, lines)

    @property
    def in_alternate_screen(self) -> bool:
        return self.main_screen is not None

    def clear_history(self) -> None:
        self.history.clear()

    def _push_history(self, line: Line) -> None:
        self.history.append(line)
        self.history_pushed += 1

    def reset(self) -> None:
        super().reset()
        self.main_screen = None

    def write_process_input(self, data: str) -> None:
        self.replies.append(data)

    def _plain_text_mode(self) -> bool:
        """Printable ASCII is drawn one cell per character, untranslated, wrapping at the edge."""
        return (
            self.charset == 0
            and self.g0_charset is charsets.LAT1_MAP
            and modes.DECAWM in self.mode
            and modes.IRM not in self.mode
        )

    def _glyph_table(self) -> _GlyphTable:
        glyphs = self._glyphs.get(self.cursor.attrs)
        if glyphs is None:
            if len(self._glyphs) >= MAX_GLYPH_TABLES:
                self._glyphs.clear()
            glyphs = self._glyphs[self.cursor.attrs] = _GlyphTable(self.cursor.attrs)
        return glyphs

    def draw(self, data: str) -> None:
        if not (data.isascii() and data.isprintable() and self._plain_text_mode()):
            super().draw(data)
            return
        # Whole runs go into a line at once, wrapping exactly where pyte's per-character loop
        # would.
        glyph = self._glyph_table().__getitem__
        cursor = self.cursor
        columns = self.columns
        start, end = 0, len(data)
        while start < end:
            if cursor.x >= columns:
                self.dirty.add(cursor.y)
                self.carriage_return()
                self.linefeed()
            x = cursor.x
            count = min(columns - x, end - start)
            self.buffer[cursor.y].update(
                zip(range(x, x + count), map(glyph, data[start : start + count]), strict=True)
            )
            cursor.x = x + count
            start += count
        self.dirty.add(cursor.y)

    def can_write_lines(self) -> bool:
        return self.cursor.x == 0 and self.margins is None and self._plain_text_mode()

    def write_lines(self, texts: list[str]) -> None:
        """Draw lines of printable ASCII, each followed by CR LF, with the cursor at the start
        of a line and no scroll region (see ``can_write_lines``). The result is what pyte
        would make of them, but a flood of short lines (``yes``) costs a few dict operations
        per line instead of renumbering every screen row per line."""
        columns, lines = self.columns, self.lines
        rows: list[str] = []
        for text in texts:
            if len(text) <= columns:
                rows.append(text)
            else:
                rows.extend(text[x : x + columns] for x in range(0, len(text), columns))
        blank = self.default_char

        def new_line() -> Line:
            return StaticDefaultDict(blank)

        keeps_history = self.main_screen is None
        screen = deque(self.buffer[y] for y in range(lines))
        y = self.cursor.y
        kept = lines + (self.history.maxlen or 0)
        if len(rows) > kept + lines:
            # The screen and all but the last `kept` rows would scroll out of the scrollback
            # anyway: start from a scrolled-out screen instead of building them.
            skipped = len(rows) - kept
            if keeps_history:
                self.history_pushed += y + skipped - (lines - 1)
                self.history.clear()
            rows = rows[skipped:]
            screen = deque(new_line() for _ in range(lines))
            y = lines - 1
        glyph = self._glyph_table().__getitem__
        for text in rows:
            if text:
                screen[y].update(zip(range(len(text)), map(glyph, text), strict=True))
            if y < lines - 1:
                y += 1
                continue
            top = screen.popleft()
            if keeps_history:
                self._push_history(top)
            screen.append(new_line())
        self.buffer.clear()
        self.buffer.update(enumerate(screen))
        self.cursor.y = y
        self.dirty.update(range(lines))

    def index(self) -> None:
        top, bottom = self.margins or Margins(0, self.lines - 1)
        # Like xterm, only a region that starts at the top row feeds the scrollback, and never
        # the alternate screen (a full-screen program's redraws are not history).
        if self.cursor.y == bottom and top == 0 and self.main_screen is None:
            self._push_history(self.buffer[0])
        super().index()

    def erase_in_display(self, how: int = 0, *args: Any, **kwargs: Any) -> None:
        super().erase_in_display(how, *args, **kwargs)
        if how == 3:
            self.clear_history()

    def set_mode(self, *modes_: int, **kwargs: Any) -> None:
        super().set_mode(*modes_, **kwargs)
        if kwargs.get("private") and ALTERNATE_SCREEN_MODES.intersection(modes_):
            self._enter_alternate_screen()

    def reset_mode(self, *modes_: int, **kwargs: Any) -> None:
        super().reset_mode(*modes_, **kwargs)
        if kwargs.get("private") and ALTERNATE_SCREEN_MODES.intersection(modes_):
            self._leave_alternate_screen()

    def _enter_alternate_screen(self) -> None:
        if self.main_screen is not None:
            return
        # The main screen's line objects leave the buffer, so nothing drawn on the alternate
        # screen can touch them.
        self.main_screen = _SavedScreen(dict(self.buffer), copy.copy(self.cursor), self.margins)
        self.buffer.clear()
        self.margins = None
        self.dirty.update(range(self.lines))

    def _leave_alternate_screen(self) -> None:
        saved, self.main_screen = self.main_screen, None
        if saved is None:
            return
        self.buffer.clear()
        self.buffer.update((y, line) for y, line in saved.buffer.items() if y < self.lines)
        self.cursor = saved.cursor
        self.margins = None
        self.ensure_hbounds()
        self.ensure_vbounds()
        self.dirty.update(range(self.lines))

    def resize(self, lines: int | None = None, columns: int | None = None) -> None:
        lines = lines or self.lines
        columns = columns or self.columns
        if (lines, columns) == (self.lines, self.columns):
            return
        if lines < self.lines:
            # Keep the cursor's row on screen by pushing rows off the top, as xterm does;
            # pyte always drops from the top, which loses the prompt's neighbourhood.
            drop = max(0, self.cursor.y + 1 - lines)
            if drop and self.main_screen is None:
                for y in range(drop):
                    self._push_history(self.buffer[y])
            kept = {y - drop: line for y, line in self.buffer.items() if drop <= y < drop + lines}
            self.buffer.clear()
            self.buffer.update(kept)
            self.cursor.y -= drop
        if columns < self.columns:
            for line in self.buffer.values():
                for x in [x for x in line if x >= columns]:
                    del line[x]
        elif columns > self.columns:
            self.tabstops.update(range(self.columns - self.columns % 8 + 8, columns, 8))
        self.lines, self.columns = lines, columns
        self.margins = None
        self.cursor.x = min(self.cursor.x, columns)
        self.ensure_vbounds()
        self.dirty.update(range(lines))


def _color(name: str) -> Color | None:
    if name == "default":
        return None
    bright = name.startswith("bright")
    number = ANSI_COLOR_NUMBERS.get(name[6:] if bright else name)
    if number is not None:
        return Color.from_ansi(number + 8 if bright else number)
    if len(name) == 6:
        try:
            return Color.from_rgb(int(name[0:2], 16), int(name[2:4], 16), int(name[4:6], 16))
        except ValueError:
            return None
    return None


class StripPainter:
    """Turns pyte lines into Textual strips, one Rich style per distinct set of attributes."""

    def __init__(self, base: Style | None = None) -> None:
        self.base = base or Style()
        self._styles: dict[tuple[Any, ...], Style] = {}

    def set_base(self, base: Style) -> None:
        if base != self.base:
            self.base = base
            self._styles.clear()

    def style(self, attrs: tuple[Any, ...], cursor: bool = False) -> Style:
        key = (*attrs, cursor)
        style = self._styles.get(key)
        if style is None:
            fg, bg, bold, italics, underscore, strikethrough, reverse, blink = attrs
            style = self._styles[key] = self.base + Style(
                color=_color(fg),
                bgcolor=_color(bg),
                bold=bold,
                italic=italics,
                underline=underscore,
                strike=strikethrough,
                blink=blink,
                reverse=reverse != cursor,
            )
        return style

    def paint(self, line: Line, columns: int, width: int, cursor_x: int | None = None) -> Strip:
        """``columns`` cells of ``line`` as a strip exactly ``width`` cells wide; ``cursor_x``
        is drawn reversed."""
        segments: list[Segment] = []
        append = segments.append
        style_for = self.style
        run: list[str] = []
        run_attrs: tuple[Any, ...] | None = None
        run_cursor = False
        for x in range(min(columns, width)):
            char = line[x]
            data = char.data
            if not data:
                continue  # the second cell of a wide character
            attrs = char[1:]
            is_cursor = x == cursor_x
            if attrs != run_attrs or is_cursor or run_cursor:
                if run:
                    append(Segment("".join(run), style_for(run_attrs or (), run_cursor)))
                run = [data]
                run_attrs, run_cursor = attrs, is_cursor
            else:
                run.append(data)
        if run and run_attrs is not None:
            append(Segment("".join(run), style_for(run_attrs, run_cursor)))
        if cursor_x is not None and cursor_x >= min(columns, width) and cursor_x < width:
            # The cursor waits past the last character (pending wrap, or a narrower emulator).
            pad = cursor_x - sum(segment.cell_length for segment in segments)
            if pad > 0:
                append(Segment(" " * pad, self.base))
            append(Segment(" ", self.base + Style(reverse=True)))
        return Strip(segments).adjust_cell_length(width, self.base)


class TerminalStream(pyte.Stream):
    @property
    def idle(self) -> bool:
        """Between sequences: what comes next is plain text or the start of a sequence."""
        return bool(self._taking_plain_text)

    def feed(self, data: str) -> None:
        # pyte sends every control character through its parser coroutine. Between runs of
        # text (the parser is idle) CR and LF, which end every line of a flood, are handled
        # here directly; everything else still goes through the parser.
        screen = self.listener
        if screen is None:
            raise RuntimeError("the stream has no screen")
        draw, carriage_return, linefeed = screen.draw, screen.carriage_return, screen.linefeed
        match_text = self._text_pattern.match
        send = self._send_to_parser
        idle = self._taking_plain_text
        offset, length = 0, len(data)
        while offset < length:
            if not idle:
                idle = send(data[offset])
                offset += 1
                continue
            match = match_text(data, offset)
            if match is not None:
                start, offset = match.span()
                draw(data[start:offset])
                continue
            char = data[offset]
            if char == "\r":
                carriage_return()
            elif char == "\n":
                linefeed()
            else:
                idle = False
                continue
            offset += 1
        self._taking_plain_text = idle


PLAIN_LINES = re.compile(r"(?:[ -~]*\r\n){2,}")


class TerminalEmulator:
    """Parse on feed, paint on demand: everything a widget needs from the terminal model."""

    def __init__(self, cols: int = 80, rows: int = 24, scrollback: int = 2000) -> None:
        self.screen = TerminalScreen(cols, rows, scrollback)
        self.stream = TerminalStream(self.screen)
        self.painter = StripPainter()

    # -- input ------------------------------------------------------------------------------

    def feed(self, text: str) -> None:
        screen, stream = self.screen, self.stream
        done = 0
        for match in PLAIN_LINES.finditer(text):
            stream.feed(text[done : match.start()])
            block = match.group()
            if not (stream.idle and screen.can_write_lines()):
                # Mid-sequence, mid-line or in a special mode: the first line goes through
                # the parser, which brings both back to normal in the common cases.
                first = block.index("\r\n") + 2
                stream.feed(block[:first])
                block = block[first:]
            if block and stream.idle and screen.can_write_lines():
                screen.write_lines(block[:-2].split("\r\n"))
            else:
                stream.feed(block)
            done = match.end()
        stream.feed(text[done:])

    def reset(self) -> None:
        """Forget everything, scrollback included: before a replay redraws the session."""
        self.screen.reset()
        self.screen.clear_history()
        self.screen.replies.clear()
        # A half-parsed escape sequence from before must not swallow the replay's start.
        self.stream = TerminalStream(self.screen)

    def resize(self, cols: int, rows: int) -> None:
        self.screen.resize(rows, cols)

    def take_dirty(self) -> set[int]:
        """Screen rows changed since the last call."""
        dirty = {y for y in self.screen.dirty if y < self.screen.lines}
        self.screen.dirty.clear()
        return dirty

    def take_replies(self) -> str:
        """What the terminal answers the program (cursor position and device reports)."""
        replies = "".join(self.screen.replies)
        self.screen.replies.clear()
        return replies

    # -- state ------------------------------------------------------------------------------

    @property
    def cols(self) -> int:
        return self.screen.columns

    @property
    def rows(self) -> int:
        return self.screen.lines

    @property
    def history_size(self) -> int:
        return len(self.screen.history)

    @property
    def history_pushed(self) -> int:
        """Lines ever pushed to the scrollback: with ``history_size`` it names a scrollback
        line for as long as it is kept."""
        return self.screen.history_pushed

    @property
    def content_height(self) -> int:
        return self.history_size + self.rows

    @property
    def app_cursor(self) -> bool:
        """DECCKM: arrow keys send ``ESC O A`` instead of ``ESC [ A``."""
        return APP_CURSOR_MODE in self.screen.mode

    @property
    def bracketed_paste(self) -> bool:
        return BRACKETED_PASTE_MODE in self.screen.mode

    @property
    def alternate_screen(self) -> bool:
        return self.screen.in_alternate_screen

    @property
    def cursor(self) -> tuple[int, int]:
        """(x, y) on the screen; x may equal ``cols`` while a wrap is pending."""
        return self.screen.cursor.x, self.screen.cursor.y

    @property
    def cursor_visible(self) -> bool:
        return not self.screen.cursor.hidden

    @property
    def title(self) -> str:
        return str(self.screen.title)

    @property
    def display(self) -> list[str]:
        """The screen as text, one string per row."""
        return list(self.screen.display)

    def line(self, content_y: int) -> Line | None:
        history = self.screen.history
        if 0 <= content_y < len(history):
            return history[content_y]
        y = content_y - len(history)
        if 0 <= y < self.rows:
            return self.screen.buffer[y]
        return None

    def line_text(self, content_y: int) -> str:
        line = self.line(content_y)
        if line is None:
            return ""
        return "".join(line[x].data for x in range(self.cols)).rstrip()

    def history_text(self) -> list[str]:
        return [self.line_text(y) for y in range(self.history_size)]

    # -- painting ---------------------------------------------------------------------------

    def paint(self, content_y: int, width: int, *, show_cursor: bool = False) -> Strip:
        line = self.line(content_y)
        if line is None:
            return Strip.blank(width, self.painter.base)
        cursor_x: int | None = None
        if show_cursor and content_y - self.history_size == self.screen.cursor.y:
            cursor_x = min(self.screen.cursor.x, self.cols - 1)
        return self.painter.paint(line, self.cols, width, cursor_x)
