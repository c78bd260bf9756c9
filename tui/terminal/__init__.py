"""The embedded terminal: a pyte emulator, the key mapping, the pane widget and the
full-screen attach. The transport lives in backend/pty_client.py."""

from tui.terminal.sessions import session_tag
from tui.terminal.widget import TerminalPane

__all__ = ["TerminalPane", "session_tag"]
