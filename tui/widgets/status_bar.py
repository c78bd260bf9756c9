"""The one-line summary above the capsule table: what runs, what the host has left, and how the
table is being shown (sort, filter)."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

from tui import format as fmt
from tui.host import HostTotals


@dataclass(frozen=True)
class StatusInfo:
    running: int = 0
    paused: int = 0
    busy: int = 0
    """Capsules in a transition (pending, pausing, resuming)."""
    failed: int = 0
    host: HostTotals | None = None
    tick_p99_ms: float | None = None
    accel: str | None = None
    sort: str = ""
    filter: str = ""
    sampler_stalled: bool = False


class StatusBar(Static):
    DEFAULT_CSS = """
    StatusBar {
        height: 1;
        padding: 0 1;
        background: $boost;
    }
    """

    info = StatusInfo()

    def show(self, info: StatusInfo) -> None:
        if info != self.info:
            self.info = info
            # One line, always: skipping the layout pass keeps a tick from re-laying the screen.
            self.update(self.render_info(info), layout=False)

    @staticmethod
    def render_info(info: StatusInfo) -> Text:
        text = Text()
        text.append(f"{info.running} running", style="green" if info.running else "dim")
        text.append(" · ")
        text.append(f"{info.paused} paused", style="blue" if info.paused else "dim")
        if info.busy:
            text.append(" · ")
            text.append(f"{info.busy} busy", style="yellow")
        if info.failed:
            text.append(" · ")
            text.append(f"{info.failed} error", style="bold red")
        text.append("   host ")
        if info.host is None:
            text.append(fmt.UNKNOWN)
        else:
            text.append(f"CPU {fmt.percent(info.host.cpu_pct)}", style="bold")
            text.append("  mem ")
            text.append(
                f"{fmt.size(info.host.mem_used)}/{fmt.size(info.host.mem_total)}", style="bold"
            )
        text.append("   sampler ")
        if info.sampler_stalled:
            text.append("stalled", style="bold red")
        else:
            p99 = fmt.UNKNOWN if info.tick_p99_ms is None else f"{info.tick_p99_ms:.0f} ms"
            text.append(f"p99 {p99}", style="bold")
        text.append("   ")
        accel = (info.accel or "…").upper()
        text.append(accel, style="bold green" if accel == "KVM" else "bold yellow")
        text.append("   sort ")
        text.append(info.sort or "created", style="bold cyan")
        if info.filter:
            text.append("   filter ")
            text.append(f"/{info.filter}", style="bold magenta")
        return text
