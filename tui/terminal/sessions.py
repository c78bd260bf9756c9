"""Which terminal session belongs to which capsule."""

from __future__ import annotations


def session_tag(capsule_id: str) -> str:
    """The envd session tag of the dashboard's shell in a capsule. Derived from the capsule
    id, so the pane opened again, the full-screen attach and a restarted dashboard all find
    the same shell."""
    return f"tui-{capsule_id}"
