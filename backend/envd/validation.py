"""Small typed accessors for JSON request bodies (pydantic is not available in the guest)."""

from __future__ import annotations

import base64
import binascii
import math
import re
import signal
from typing import Any

from .errors import bad_request

TAG_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


class Fields:
    """Typed, validating view of one JSON object; every mistake becomes a 400 ``invalid_field``."""

    def __init__(self, obj: object, where: str = "request body") -> None:
        if not isinstance(obj, dict):
            raise bad_request(f"{where} must be a JSON object", "invalid_body")
        self._obj: dict[str, Any] = obj
        self._where = where

    def raw(self, key: str, default: object = None) -> object:
        value = self._obj.get(key)
        return default if value is None else value

    def __contains__(self, key: str) -> bool:
        return key in self._obj and self._obj[key] is not None

    def _fail(self, key: str, expected: str) -> Exception:
        got = type(self._obj.get(key)).__name__
        return bad_request(f"field {key!r} must be {expected}, got {got}", "invalid_field")

    def _missing(self, key: str) -> Exception:
        return bad_request(f"field {key!r} is required", "invalid_field")

    def opt_str(self, key: str) -> str | None:
        value = self._obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise self._fail(key, "a string")
        return value

    def req_str(self, key: str) -> str:
        value = self.opt_str(key)
        if value is None:
            raise self._missing(key)
        return value

    def opt_int(self, key: str) -> int | None:
        value = self._obj.get(key)
        if value is None:
            return None
        # bool is an int subclass; true/false are never meant as numbers here.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, "an integer")
        return value

    def opt_number(self, key: str) -> float | None:
        value = self._obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._fail(key, "a number")
        number = float(value)
        if not math.isfinite(number):
            raise self._fail(key, "a finite number")
        return number

    def opt_bool(self, key: str) -> bool | None:
        value = self._obj.get(key)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise self._fail(key, "a boolean")
        return value

    def opt_str_list(self, key: str) -> list[str] | None:
        value = self._obj.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._fail(key, "a list of strings")
        return list(value)

    def opt_str_map(self, key: str) -> dict[str, str] | None:
        value = self._obj.get(key)
        if value is None:
            return None
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self._fail(key, "an object of string values")
        return {str(k): v for k, v in value.items()}

    def opt_b64(self, key: str) -> bytes | None:
        value = self.opt_str(key)
        if value is None:
            return None
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"field {key!r} is not valid base64", "invalid_field") from None


def check_env(env: dict[str, str]) -> dict[str, str]:
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise bad_request(
                f"invalid environment variable name or value: {name!r}", "invalid_field"
            )
    return env


def ascii_digits(text: str, most: int = 18) -> bool:
    """``0``-``9`` only, at most `most` of them: ``str.isdigit`` also says yes to ``²`` and
    other scripts' digits, which ``int`` then refuses."""
    return 0 < len(text) <= most and text.isascii() and text.isdigit()


def parse_signal(value: object) -> signal.Signals:
    """Accept ``"SIGTERM"``, ``"TERM"``, ``"sigterm"``, ``15`` or ``"15"``."""
    if isinstance(value, bool):
        raise bad_request("signal must be a name like 'SIGTERM' or a number", "invalid_signal")
    if isinstance(value, str):
        text = value.strip().upper()
        if ascii_digits(text):
            value = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            try:
                return signal.Signals[name]
            except KeyError:
                raise bad_request(f"unknown signal {value!r}", "invalid_signal") from None
    if isinstance(value, int):
        try:
            return signal.Signals(value)
        except ValueError:
            raise bad_request(f"unknown signal number {value}", "invalid_signal") from None
    raise bad_request("signal must be a name like 'SIGTERM' or a number", "invalid_signal")


def check_tag(tag: str) -> str:
    """Tags name processes and PTY sessions in URLs and messages; digits alone mean a pid."""
    if not TAG_RE.match(tag) or ascii_digits(tag):
        raise bad_request(
            "tag must be 1-128 characters of letters, digits and ._:@- and not only digits",
            "invalid_tag",
        )
    return tag
