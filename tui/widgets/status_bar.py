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
    fits: int | None = None
    """More capsules of the default size the host's memory has room for."""
    warnings: tuple[str, ...] = ()


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
            self.refresh(layout=False)

    def render(self) -> Text:
        return self.render_info(self.info, self.content_region.width or 200)

    def on_resize(self) -> None:
        self.refresh(layout=False)

    @staticmethod
    def render_info(info: StatusInfo, width: int = 200) -> Text:
        """The parts that fit `width`, whole: the least important give way first (the
        sampler's p99, then the sort, the accelerator, the filter); the capsule counts and
        the host's figures always show."""
        parts = _parts(info)
        while sum(part.cell_len for _, part in parts) + SEPARATOR_WIDTH * (len(parts) - 1) > width:
            if len(parts) <= 2:
                break
            parts.remove(min(parts[2:], key=lambda item: item[0]))
        line = Text()
        for index, (_, part) in enumerate(parts):
            if index:
                line.append(SEPARATOR, style="dim")
            line.append_text(part)
        line.truncate(width, overflow="ellipsis")
        return line


SEPARATOR = "  "
SEPARATOR_WIDTH = len(SEPARATOR)


def _parts(info: StatusInfo) -> list[tuple[int, Text]]:
    """(priority, text) in display order; a higher priority stays longer."""
    counts = Text()
    counts.append(f"{info.running} running", style="green" if info.running else "dim")
    counts.append(" · ")
    counts.append(f"{info.paused} paused", style="blue" if info.paused else "dim")
    if info.busy:
        counts.append(" · ")
        counts.append(f"{info.busy} busy", style="yellow")
    if info.failed:
        counts.append(" · ")
        counts.append(f"{info.failed} error", style="bold red")
    host = Text("host ")
    if info.host is None:
        host.append(fmt.UNKNOWN)
    else:
        host.append(f"CPU {fmt.percent(info.host.cpu_pct)}", style="bold")
        host.append(" mem ")
        host.append(f"{fmt.size(info.host.mem_used)}/{fmt.size(info.host.mem_total)}", style="bold")
        if info.fits is not None:
            host.append(" room ")
            host.append(f"+{info.fits}", style="bold" if info.fits else "bold red")
    parts: list[tuple[int, Text]] = [(9, counts), (8, host)]
    if info.warnings:
        parts.insert(1, (10, Text("⚠ " + "; ".join(info.warnings), style="bold red")))
    accel = (info.accel or "…").upper()
    parts.append((5, Text(accel, style="bold green" if accel == "KVM" else "bold yellow")))
    sort = Text("sort ")
    sort.append(info.sort or "created", style="bold cyan")
    parts.append((3, sort))
    if info.filter:
        parts.append((6, Text.assemble("filter ", (f"/{info.filter}", "bold magenta"))))
    sampler = Text("sampler ")
    if info.sampler_stalled:
        sampler.append("stalled", style="bold red")
        parts.append((7, sampler))
    else:
        p99 = fmt.UNKNOWN if info.tick_p99_ms is None else f"{info.tick_p99_ms:.0f} ms"
        sampler.append(f"p99 {p99}", style="bold")
        parts.append((1, sampler))
    return parts
