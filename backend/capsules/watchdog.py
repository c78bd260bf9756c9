"""The watchdog: notices VMs that died under a running capsule, and pauses idle capsules
whose auto-pause time has passed. Once a second, never overlapping itself. Once a minute it
also gives back template RAM that clones faulted in (ramdiff.TemplateRam.trim)."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from backend.capsules.errors import CapsuleError
from backend.capsules.models import Capsule, State
from backend.runtime.logs import CONSOLE_MAX, cap_console

if TYPE_CHECKING:
    from backend.capsules.manager import CapsuleManager

log = logging.getLogger("wrenn.watchdog")

INTERVAL_S = 1.0
TRIM_EVERY_S = 60.0
"""How often template RAM that clones faulted in (first writes to its holes) is given back."""


class Watchdog:
    def __init__(self, manager: CapsuleManager) -> None:
        self.m = manager
        self._trimmed_at = time.monotonic()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            try:
                await self.check()
            except Exception:
                log.exception("the watchdog's check failed; trying again in %.0f s", INTERVAL_S)

    async def check(self) -> None:
        if time.monotonic() - self._trimmed_at >= TRIM_EVERY_S:
            self._trimmed_at = time.monotonic()
            self.m.trim_bases_soon()
        now = time.time()
        for capsule in self.m.store.list_capsules():
            if capsule.state != State.RUNNING or self.m.locks.busy(capsule.id):
                continue
            try:
                await self._check_one(capsule, now)
            except Exception:
                # One capsule's trouble must not stop the others' checks: said, not hidden.
                log.exception("the watchdog's check of %s failed", capsule.id)

    async def _check_one(self, capsule: Capsule, now: float) -> None:
        # the guest's serial console, and QEMU's own log (a guest can make QEMU warn per page)
        for path in (self.m.layout.console_log(capsule.id), self.m.layout.vmm_log(capsule.id)):
            if await asyncio.to_thread(cap_console, path):
                log.info("%s: %s passed %d bytes; rotated", capsule.id, path.name, CONSOLE_MAX)
        if not self.m.vm_alive(capsule):
            await self._vm_died(capsule.id)
        elif capsule.auto_pause_s > 0 and now - capsule.last_activity > capsule.auto_pause_s:
            self.m.event(capsule.id, "auto-pause", f"idle for {capsule.auto_pause_s} s")
            try:
                await self.m.pause(capsule.id)
            except CapsuleError as exc:
                log.warning("auto-pause of %s failed: %s", capsule.id, exc)

    async def _vm_died(self, capsule_id: str) -> None:
        async with self.m.locks.hold(capsule_id):
            current = self.m.store.get(capsule_id)
            if current is None or current.state != State.RUNNING or self.m.vm_alive(current):
                return
            reason = f"QEMU exited unexpectedly; {self.m.vmm_log_tail(current)}"
            self.m.event(current.id, "error", reason)
            self.m.forget_vm(current.id)
            self.m.save(current.with_(state=State.ERROR, reason=reason, pid=None))
