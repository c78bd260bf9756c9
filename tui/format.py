"""How numbers read in the dashboard: short, fixed-width friendly, and '—' when unknown."""

from __future__ import annotations

UNKNOWN = "—"


def size(value: float | None) -> str:
    """Bytes in binary units with three significant figures: `812K`, `1.4G`."""
    if value is None:
        return UNKNOWN
    amount = float(value)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(amount) < 1024 or unit == "T":
            if unit == "B":
                return f"{amount:.0f}B"
            return f"{amount:.1f}{unit}" if abs(amount) < 100 else f"{amount:.0f}{unit}"
        amount /= 1024
    raise AssertionError("unreachable")


def mib(value: int) -> str:
    return f"{value / 1024:g}G" if value >= 1024 and value % 1024 == 0 else f"{value}M"


def percent(value: float | None) -> str:
    return UNKNOWN if value is None else f"{value:.0f}%"


def duration(seconds: float | None) -> str:
    """`42s`, `7m03s`, `3h12m`, `5d04h`: the two largest units."""
    if seconds is None:
        return UNKNOWN
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def age(seconds: float) -> str:
    """Like k9s' AGE: seconds only while they matter (`42s`, `7m03s`, `47m`, `3h12m`, `5d04h`),
    so a long-running row does not change every second."""
    total = max(0, int(seconds))
    if total < 600:
        return duration(total)
    if total < 3 * 3600:
        return f"{total // 60}m"
    return duration(total)
