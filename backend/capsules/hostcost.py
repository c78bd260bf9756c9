"""What a running capsule costs the host's memory (issue 21), read from /proc and the files.

A clone (a capsule made from a template) maps the template's RAM privately: the pages it never
wrote are the template's, held once for all its clones. So its cost is
- `own`: QEMU's anonymous memory (`RssAnon`: its heap, TCG's translated code, and the guest
  pages this capsule alone holds, i.e. the ones it wrote), plus
- its share of the template's RAM: that RAM divided among the running clones of it.
A capsule that is not a clone (booted cold, or resumed from the disk only) has a RAM file of its
own in /dev/shm instead, all of it its cost. QEMU's RSS counts the template pages a clone maps
in every clone: it overstates what clones cost, and understates a RAM file nobody maps.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from backend import sparse
from backend.capsules.models import Capsule, State
from backend.capsules.snapshots import RAM, RAM_BASE

if TYPE_CHECKING:
    from backend.capsules.manager import CapsuleManager


@dataclass(frozen=True)
class HostCost:
    own: int
    """QEMU's private memory (bytes): its heap, TCG's code, the guest pages it alone holds."""
    ram_file: int
    """A RAM file of its own (not a clone), bytes allocated."""
    template: int
    """The template RAM a clone maps (bytes held in memory), shared with `sharing` clones."""
    sharing: int
    """Running clones of the same template (this one included); 0 when not a clone."""

    @property
    def template_share(self) -> int:
        return self.template // self.sharing if self.sharing else 0

    @property
    def total(self) -> int:
        return self.own + self.ram_file + self.template_share


def rss_anon(pid: int) -> int | None:
    """A process's resident anonymous memory (bytes), None when it is gone or not readable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def host_costs(
    m: CapsuleManager,
    capsules: list[Capsule],
    own: Callable[[Capsule], int | None] | None = None,
) -> dict[str, HostCost]:
    """The cost of each running capsule of `capsules` (all capsules: clones are counted
    among all running ones). `own`: QEMU's own memory as already read (the sampler's latest
    sample, so that the dashboard does not read /proc for every capsule again each second);
    None from it, or no `own`, reads /proc."""
    running = [c for c in capsules if c.state == State.RUNNING and c.pid is not None]
    sharing = Counter(c.extra.get(RAM_BASE) for c in running if c.extra.get(RAM_BASE))
    template_bytes: dict[str, int] = {}
    out: dict[str, HostCost] = {}
    for c in running:
        assert c.pid is not None
        qemu_own = own(c) if own is not None else None
        if qemu_own is None:
            qemu_own = rss_anon(c.pid)
        if qemu_own is None:
            continue
        base = c.extra.get(RAM_BASE)
        if isinstance(base, str):
            if base not in template_bytes:
                held = m.bases.allocated_for(Path(base) / RAM)
                # a base this process has not opened (its clones were started by another
                # process): its file's size is what the other process holds
                template_bytes[base] = (
                    held if held is not None else sparse.allocated_bytes(Path(base) / RAM)
                )
            out[c.id] = HostCost(qemu_own, 0, template_bytes[base], sharing[base])
        else:
            ram = sparse.allocated_bytes(m.layout.ram_file(c.id))
            out[c.id] = HostCost(qemu_own, ram, 0, 0)
    return out
