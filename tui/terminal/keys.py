"""Textual key events -> the bytes an xterm would send for them (TERM=xterm-256color).

Modifiers follow xterm: on cursor, editing and function keys they become a parameter
(``ESC [ 1 ; 5 A`` is ctrl+up); with alt any other key is prefixed with ESC. Without
modifiers the arrows, home and end honour DECCKM (application cursor mode: ``ESC O A``).
"""

from __future__ import annotations

ESC = "\x1b"
CSI = ESC + "["
SS3 = ESC + "O"

BRACKETED_PASTE_START = CSI + "200~"
BRACKETED_PASTE_END = CSI + "201~"

# Final byte of the cursor keys: CSI <final> normally, SS3 <final> in application mode.
CURSOR_KEYS = {"up": "A", "down": "B", "right": "C", "left": "D", "home": "H", "end": "F"}
# F1-F4 are SS3 P..S unmodified and CSI 1;<mod> P..S with modifiers.
SS3_FUNCTION_KEYS = {"f1": "P", "f2": "Q", "f3": "R", "f4": "S"}
# CSI <number> ~ keys.
TILDE_KEYS = {
    "insert": 2,
    "delete": 3,
    "pageup": 5,
    "pagedown": 6,
    "f5": 15,
    "f6": 17,
    "f7": 18,
    "f8": 19,
    "f9": 20,
    "f10": 21,
    "f11": 23,
    "f12": 24,
}
PLAIN_KEYS = {
    "enter": "\r",
    "return": "\r",
    "tab": "\t",
    "backspace": "\x7f",
    "escape": ESC,
    "space": " ",
}
CONTROL_SYMBOLS = {
    "@": "\x00",
    "at": "\x00",
    "space": "\x00",
    "left_square_bracket": ESC,
    "backslash": "\x1c",
    "right_square_bracket": "\x1d",
    "circumflex_accent": "\x1e",
    "underscore": "\x1f",
    "minus": "\x1f",
    "question_mark": "\x7f",
    "slash": "\x1f",
}
MODIFIER_BITS = {"shift": 1, "alt": 2, "ctrl": 4, "meta": 8, "super": 8}


def _split(key: str) -> tuple[frozenset[str], str]:
    """``ctrl+shift+up`` -> ({ctrl, shift}, up). A key named ``plus`` is never a separator."""
    *modifiers, name = key.split("+")
    return frozenset(modifiers), name


def _xterm_modifier(modifiers: frozenset[str]) -> int:
    return 1 + sum(MODIFIER_BITS.get(modifier, 0) for modifier in modifiers)


def _named_key(name: str, modifiers: frozenset[str], app_cursor: bool) -> str | None:
    if name.startswith("f") and name[1:].isdigit() and 13 <= int(name[1:]) <= 24:
        # Textual names shift+F1..F12 F13..F24, as the xterm sequences for them are shared.
        name, modifiers = f"f{int(name[1:]) - 12}", modifiers | {"shift"}
    if name in CURSOR_KEYS:
        final = CURSOR_KEYS[name]
        if modifiers:
            return f"{CSI}1;{_xterm_modifier(modifiers)}{final}"
        return (SS3 if app_cursor else CSI) + final
    if name in SS3_FUNCTION_KEYS:
        final = SS3_FUNCTION_KEYS[name]
        if modifiers:
            return f"{CSI}1;{_xterm_modifier(modifiers)}{final}"
        return SS3 + final
    if name in TILDE_KEYS:
        number = TILDE_KEYS[name]
        if modifiers:
            return f"{CSI}{number};{_xterm_modifier(modifiers)}~"
        return f"{CSI}{number}~"
    if name == "tab" and modifiers == {"shift"}:
        return CSI + "Z"
    return None


def _control(name: str) -> str | None:
    if len(name) == 1 and name.isascii() and name.isalpha():
        return chr(ord(name.lower()) & 0x1F)
    return CONTROL_SYMBOLS.get(name)


def key_to_text(key: str, character: str | None, *, app_cursor: bool = False) -> str | None:
    """The input for a key event, or None when a terminal would send nothing for it."""
    modifiers, name = _split(key)
    # Textual reports backtab for shift+tab from some terminals.
    if key == "backtab":
        return CSI + "Z"
    special = _named_key(name, modifiers, app_cursor)
    if special is not None:
        return special
    if "alt" in modifiers or "meta" in modifiers:
        rest = "+".join([*sorted(modifiers - {"alt", "meta"}), name])
        inner_character = character if character and character.isprintable() else None
        inner = key_to_text(rest, inner_character, app_cursor=app_cursor)
        return None if inner is None else ESC + inner
    if "ctrl" in modifiers:
        control = _control(name)
        if control is not None:
            return control
        if name in PLAIN_KEYS:
            return PLAIN_KEYS[name]
    if not modifiers - {"shift"} and name in PLAIN_KEYS:
        return PLAIN_KEYS[name]
    if character:
        if character.isprintable() or (len(character) == 1 and ord(character) < 0x20):
            return character
        if character == "\x7f":
            return character
    if not modifiers and len(name) == 1:
        return name
    return None


def key_to_bytes(key: str, character: str | None, *, app_cursor: bool = False) -> bytes | None:
    text = key_to_text(key, character, app_cursor=app_cursor)
    return None if text is None else text.encode("utf-8")


def paste_text(text: str, *, bracketed: bool) -> str:
    """Pasted text as a terminal types it: newlines become CR; in bracketed-paste mode the
    text is fenced (and cannot close the fence early)."""
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    if not bracketed:
        return text
    return BRACKETED_PASTE_START + text.replace(BRACKETED_PASTE_END, "") + BRACKETED_PASTE_END
