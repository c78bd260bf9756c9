"""Textual key events -> what an xterm sends."""

from __future__ import annotations

import pytest

from tui.terminal.keys import key_to_bytes, paste_text


@pytest.mark.parametrize(
    ("key", "character", "expected"),
    [
        ("a", "a", b"a"),
        ("A", "A", b"A"),
        ("latin_small_letter_e_with_acute", "é", "é".encode()),
        ("space", " ", b" "),
        ("enter", "\r", b"\r"),
        ("enter", None, b"\r"),
        ("tab", "\t", b"\t"),
        ("shift+tab", None, b"\x1b[Z"),
        ("backspace", "\x7f", b"\x7f"),
        ("backspace", "\x08", b"\x7f"),
        ("escape", "\x1b", b"\x1b"),
        ("ctrl+c", None, b"\x03"),
        ("ctrl+a", "\x01", b"\x01"),
        ("ctrl+z", None, b"\x1a"),
        ("ctrl+backslash", None, b"\x1c"),
        ("ctrl+@", None, b"\x00"),
        ("alt+x", "x", b"\x1bx"),
        ("alt+shift+a", "A", b"\x1bA"),
        ("alt+ctrl+b", None, b"\x1b\x02"),
        ("up", None, b"\x1b[A"),
        ("down", None, b"\x1b[B"),
        ("right", None, b"\x1b[C"),
        ("left", None, b"\x1b[D"),
        ("home", None, b"\x1b[H"),
        ("end", None, b"\x1b[F"),
        ("ctrl+right", None, b"\x1b[1;5C"),
        ("shift+up", None, b"\x1b[1;2A"),
        ("insert", None, b"\x1b[2~"),
        ("delete", None, b"\x1b[3~"),
        ("pageup", None, b"\x1b[5~"),
        ("pagedown", None, b"\x1b[6~"),
        ("f1", None, b"\x1bOP"),
        ("f4", None, b"\x1bOS"),
        ("f5", None, b"\x1b[15~"),
        ("f10", None, b"\x1b[21~"),
        ("f12", None, b"\x1b[24~"),
        ("ctrl+f2", None, b"\x1b[1;5Q"),
        ("f13", None, b"\x1b[1;2P"),
    ],
)
def test_keys_send_what_xterm_sends(key: str, character: str | None, expected: bytes) -> None:
    assert key_to_bytes(key, character) == expected


@pytest.mark.parametrize(
    ("key", "normal", "application"),
    [
        ("up", b"\x1b[A", b"\x1bOA"),
        ("down", b"\x1b[B", b"\x1bOB"),
        ("right", b"\x1b[C", b"\x1bOC"),
        ("left", b"\x1b[D", b"\x1bOD"),
        ("home", b"\x1b[H", b"\x1bOH"),
        ("end", b"\x1b[F", b"\x1bOF"),
        ("ctrl+up", b"\x1b[1;5A", b"\x1b[1;5A"),
        ("pageup", b"\x1b[5~", b"\x1b[5~"),
    ],
)
def test_application_cursor_mode_changes_only_unmodified_cursor_keys(
    key: str, normal: bytes, application: bytes
) -> None:
    assert key_to_bytes(key, None, app_cursor=False) == normal
    assert key_to_bytes(key, None, app_cursor=True) == application


def test_all_function_keys_and_ctrl_letters_send_something_distinct() -> None:
    function_keys = {key_to_bytes(f"f{n}", None) for n in range(1, 13)}
    assert len(function_keys) == 12 and None not in function_keys
    letters = [key_to_bytes(f"ctrl+{chr(c)}", None) for c in range(ord("a"), ord("z") + 1)]
    assert letters == [bytes([n]) for n in range(1, 27)]


def test_keys_a_terminal_cannot_send_are_none() -> None:
    assert key_to_bytes("ignore", "\x1b[99~") is None
    assert key_to_bytes("ctrl+f99", None) is None


def test_paste_turns_newlines_into_returns() -> None:
    assert paste_text("a\nb\r\nc", bracketed=False) == "a\rb\rc"


def test_bracketed_paste_is_fenced_and_cannot_be_closed_from_inside() -> None:
    pasted = paste_text("ls\x1b[201~rm -rf /\n", bracketed=True)
    assert pasted == "\x1b[200~lsrm -rf /\r\x1b[201~"
