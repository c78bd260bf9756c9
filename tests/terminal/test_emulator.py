"""The emulator fed byte streams, as a program would write them."""

from __future__ import annotations

import random
import string

import pyte
import pytest
from rich.color import Color
from rich.style import Style
from textual.strip import Strip

from tui.terminal.emulator import TerminalEmulator


def styles_of(strip: Strip, text: str) -> Style:
    """The style of the segment holding ``text``."""
    for segment in strip:
        if text in segment.text:
            assert segment.style is not None
            return segment.style
    raise AssertionError(f"{text!r} not in {strip.text!r}")


def test_text_lines_and_wrapping() -> None:
    emulator = TerminalEmulator(10, 4)
    emulator.feed("hello\r\nworld, this wraps\r\n")
    assert emulator.display == ["hello     ", "world, thi", "s wraps   ", "          "]
    assert emulator.cursor == (0, 3)


def random_output(seed: int, pieces: int = 600) -> str:
    """Text, line ends (often several in a row), colours, cursor moves, a scroll region, the
    alternate screen, non-ASCII: what the fast paths must get exactly right."""
    rng = random.Random(seed)
    printable = string.printable[:94] + " "
    extras = ["\x1b[1;31m", "\x1b[0m", "\x1b[3C", "\x1b[2;5H", "\t", "é✓中", "\r", "\n", "\x1b[K"]
    extras += ["\x1b[2;4r", "\x1b[r", "\x1b[?1049h", "\x1b[?1049l", "\x1b[?7l", "\x1b[?7h"]
    out = []
    for _ in range(pieces):
        out.append("".join(rng.choice(printable) for _ in range(rng.choice([0, 1, 5, 23, 24, 50]))))
        if rng.random() < 0.6:
            out.append("\r\n" * rng.choice([1, 2, 3, 30]))
        else:
            out.append(rng.choice(extras))
    return "".join(out)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fast_paths_draw_exactly_what_pyte_draws(seed: int) -> None:
    text = random_output(seed).replace("\x1b[?1049h", "").replace("\x1b[?1049l", "")
    ours = TerminalEmulator(23, 7)
    theirs = pyte.Screen(23, 7)
    reference = pyte.Stream(theirs)
    for start in range(0, len(text), 997):
        ours.feed(text[start : start + 997])
        reference.feed(text[start : start + 997])
    assert ours.display == theirs.display
    assert ours.cursor == (theirs.cursor.x, theirs.cursor.y)
    for y in range(7):
        for x in range(23):
            assert ours.screen.buffer[y][x] == theirs.buffer[y][x], (x, y)


@pytest.mark.parametrize(("seed", "scrollback"), [(4, 1000), (5, 1000), (6, 3)])
def test_bulk_lines_keep_the_same_scrollback_as_one_character_at_a_time(
    seed: int, scrollback: int
) -> None:
    text = random_output(seed) + "x\r\n" * 500
    bulk = TerminalEmulator(23, 7, scrollback)
    slow = TerminalEmulator(23, 7, scrollback)
    bulk.feed(text)
    for char in text:
        slow.feed(char)
    assert bulk.display == slow.display
    assert bulk.cursor == slow.cursor
    assert bulk.history_text() == slow.history_text()
    assert bulk.history_pushed == slow.history_pushed


def test_bold_red_and_reverse_become_rich_styles() -> None:
    emulator = TerminalEmulator(20, 2)
    emulator.feed("\x1b[1;31mRED\x1b[0m \x1b[7mREV\x1b[0m \x1b[4;3mUI\x1b[0m plain")
    strip = emulator.paint(0, 20)
    red = styles_of(strip, "RED")
    assert red.bold and red.color == Color.from_ansi(1)
    assert styles_of(strip, "REV").reverse
    underline_italic = styles_of(strip, "UI")
    assert underline_italic.underline and underline_italic.italic
    plain = styles_of(strip, "plain")
    assert not plain.bold and not plain.reverse and plain.color is None
    assert strip.cell_length == 20


def test_256_colours_bright_colours_and_truecolor() -> None:
    emulator = TerminalEmulator(20, 1)
    emulator.feed("\x1b[38;5;196mA\x1b[48;5;21mB\x1b[0m\x1b[38;2;1;2;3mC\x1b[0m\x1b[92mD")
    strip = emulator.paint(0, 20)
    assert styles_of(strip, "A").color == Color.from_rgb(255, 0, 0)
    assert styles_of(strip, "B").bgcolor == Color.from_rgb(0, 0, 255)
    assert styles_of(strip, "C").color == Color.from_rgb(1, 2, 3)
    assert styles_of(strip, "D").color == Color.from_ansi(10)


def test_default_colours_come_from_the_widget_style() -> None:
    emulator = TerminalEmulator(5, 1)
    emulator.painter.set_base(Style(color="#eeeeee", bgcolor="#101010"))
    emulator.feed("ab")
    style = styles_of(emulator.paint(0, 5), "ab")
    assert style.bgcolor == Color.parse("#101010")


def test_cursor_is_drawn_reversed_only_when_asked() -> None:
    emulator = TerminalEmulator(10, 2)
    emulator.feed("ab\x1b[D")
    assert emulator.cursor == (1, 0)
    with_cursor = list(emulator.paint(0, 10, show_cursor=True))
    cursor_segment = next(segment for segment in with_cursor if segment.text == "b")
    assert cursor_segment.style is not None and cursor_segment.style.reverse
    assert not any(segment.style and segment.style.reverse for segment in emulator.paint(0, 10))


def test_cursor_movement_and_erasing() -> None:
    emulator = TerminalEmulator(10, 5)
    emulator.feed("\x1b[3;4Hx\x1b[1;1Hyy\x1b[Kz")
    assert emulator.display[2][3] == "x"
    assert emulator.display[0].rstrip() == "yyz"
    emulator.feed("\x1b[2J")
    assert all(not line.strip() for line in emulator.display)


def test_dirty_rows_name_what_changed() -> None:
    emulator = TerminalEmulator(10, 5)
    emulator.take_dirty()
    emulator.feed("\x1b[4;1Hchanged")
    assert emulator.take_dirty() == {3}
    assert emulator.take_dirty() == set()


def test_scrollback_keeps_lines_scrolled_off_the_top() -> None:
    emulator = TerminalEmulator(20, 5, scrollback=50)
    emulator.feed("".join(f"line {n}\r\n" for n in range(30)))
    assert emulator.history_size == 26
    assert emulator.history_text()[0] == "line 0"
    assert emulator.line_text(emulator.history_size) == "line 26"
    emulator.feed("".join(f"more {n}\r\n" for n in range(100)))
    assert emulator.history_size == 50
    assert emulator.history_pushed == 126
    emulator.feed("\x1b[3J")
    assert emulator.history_size == 0


def test_alternate_screen_leaves_the_shell_screen_and_scrollback_untouched() -> None:
    emulator = TerminalEmulator(20, 4)
    emulator.feed("$ vim\r\n")
    before, history = emulator.display, emulator.history_size
    emulator.feed("\x1b[?1049h\x1b[2J\x1b[H")
    assert emulator.alternate_screen
    emulator.feed("".join(f"~ {n}\r\n" for n in range(20)))
    assert emulator.history_size == history
    emulator.feed("\x1b[?1049l")
    assert not emulator.alternate_screen
    assert emulator.display == before


def test_shrinking_keeps_the_cursor_row_and_scrolls_the_rest_into_history() -> None:
    emulator = TerminalEmulator(20, 6)
    emulator.feed("".join(f"row {n}\r\n" for n in range(5)) + "$ ")
    emulator.resize(20, 3)
    assert (emulator.cols, emulator.rows) == (20, 3)
    assert [line.rstrip() for line in emulator.display] == ["row 3", "row 4", "$"]
    assert emulator.cursor == (2, 2)
    assert emulator.history_text() == ["row 0", "row 1", "row 2"]
    emulator.resize(30, 5)
    emulator.feed("\x1b[1;30HX")
    assert emulator.display[0][29] == "X"
    assert len(emulator.display) == 5


def test_modes_that_change_what_keys_send_are_tracked() -> None:
    emulator = TerminalEmulator()
    assert not emulator.app_cursor and not emulator.bracketed_paste
    emulator.feed("\x1b[?1h\x1b[?2004h")
    assert emulator.app_cursor and emulator.bracketed_paste
    emulator.feed("\x1b[?1l")
    assert not emulator.app_cursor and emulator.bracketed_paste
    emulator.feed("\x1b[?2004l")
    assert not emulator.bracketed_paste


def test_queries_are_answered_and_titles_kept() -> None:
    emulator = TerminalEmulator(10, 5)
    emulator.feed("\x1b[3;4H\x1b[6n\x1b]0;my title\x07")
    assert emulator.take_replies() == "\x1b[3;4R"
    assert emulator.take_replies() == ""
    assert emulator.title == "my title"


def test_reset_forgets_screen_history_and_a_half_parsed_sequence() -> None:
    emulator = TerminalEmulator(10, 3)
    emulator.feed("".join(f"{n}\r\n" for n in range(10)) + "\x1b[1;3")
    emulator.reset()
    emulator.feed("fresh")
    assert emulator.history_size == 0
    assert emulator.display[0].rstrip() == "fresh"


@pytest.mark.parametrize("width", [4, 10, 16])
def test_wide_characters_keep_the_strip_width(width: int) -> None:
    emulator = TerminalEmulator(10, 1)
    emulator.feed("中文ab")
    strip = emulator.paint(0, width)
    assert strip.cell_length == width
    assert strip.text.startswith("中文ab"[: max(1, width // 2)])
