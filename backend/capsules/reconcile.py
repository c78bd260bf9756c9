"""Re-adoption: bring every capsule an earlier agent left to a consistent, usable state.

State lives in SQLite and QEMU runs in its own session, so VMs outlive the agent. At start,
each capsule's VM is found by pid (runtime.attach checks it really is that capsule's VMM), and
whatever operation the agent died in is finished or undone:

  running, VM alive        kept; if a capture (template, fork) was cut short, the VM is run
                           again, its balloon deflated and envd's snapshot hold released
  pending/resuming, alive  run, balloon deflated, /init completed (a kill between restore and
                           /init left envd with its snapshot's identity) -> running
  pending fork clone, dead removed entirely (a fork leaves all its clones or none)
  pending/running, dead    error, with the VMM's last words
  resuming, dead           paused again (its generation is intact)
  pausing, alive           run again as above -> running; a half-written generation removed
  pausing, dead            paused if the new generation was committed, else error
  paused                   error if its generation is missing
  a recipe build's capsule removed, alive or not, when no live agent holds its build
                           (backend/recipes/builder.py: the build's locked work dir is gone)
Also removed: work directories nobody holds (a killed template create or fork), and network
namespaces of capsules that are gone.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from typing import TYPE_CHECKING

from backend.capsules import snapshots
from backend.capsules.builds import build_abandoned
from backend.capsules.envd_client import EnvdError
from backend.capsules.guest import init_body
from backend.capsules.models import Capsule, State
from backend.runtime.base import VM, VMMError

if TYPE_CHECKING:
    from backend.capsules.manager import CapsuleManager

log = logging.getLogger("wrenn.reconcile")

INIT_DEADLINE_S = 30.0


class Reconciler:
    def __init__(self, manager: CapsuleManager) -> None:
        self.m = manager

    async def run(self) -> None:
        for path in self.m.layout.remove_abandoned_work():
            log.info("removed work left by a killed agent: %s", path)
        for capsule in self.m.store.list_capsules():
            async with self.m.locks.hold(capsule.id):
                current = self.m.store.get(capsule.id)
                if current is not None:
                    await self.reconcile(current)
        await self.m.networks.reconcile(
            self.m.store.list_capsules(),
            lambda capsule, message: self.m.event(capsule.id, "error", message),
        )

    async def reconcile(self, capsule: Capsule) -> None:
        vm = self.m.vm(capsule) if capsule.pid is not None else None
        alive = vm is not None and vm.alive()
        state = capsule.state
        if build_abandoned(capsule):
            if alive:
                assert vm is not None
                vm.kill()
                await vm.wait_exit(5)
            await self.m.networks.teardown(capsule)
            self._remove(capsule, f"build of {capsule.extra.get('build')} cut short")
        elif state == State.RUNNING and alive:
            assert vm is not None
            if capsule.extra.get("capturing") or not await self._vcpus_running(vm):
                await self._run_again(capsule, vm, "a capture was interrupted")
                self._save_running(capsule, "capture interrupted by an agent restart")
        elif state == State.PENDING and capsule.extra.get("fork_of"):
            # a fork is all or nothing: its unfinished clones go, started or not
            if alive:
                assert vm is not None
                vm.kill()
                await vm.wait_exit(5)
            await self.m.networks.teardown(capsule)
            self._remove(capsule, "fork interrupted by an agent restart")
        elif state in (State.PENDING, State.RESUMING) and alive:
            assert vm is not None
            await self._complete_start(capsule, vm)
        elif state == State.RESUMING and self.m.layout.generation_ready(
            capsule.id, capsule.generation
        ):
            self.m.layout.cleanup_run_files(capsule.id)
            self.m.save(
                capsule.with_(
                    state=State.PAUSED, pid=None, reason="the agent stopped during resume"
                )
            )
        elif state in (State.RUNNING, State.PENDING, State.RESUMING):
            reason = f"QEMU (pid {capsule.pid}) is gone; {self.m.vmm_log_tail(capsule)}"
            self.m.event(capsule.id, "error", reason)
            self.m.save(capsule.with_(state=State.ERROR, reason=reason, pid=None))
        elif state == State.PAUSING:
            await self._finish_pause(capsule, vm if alive else None)
        elif state == State.PAUSED and not self.m.layout.generation_ready(
            capsule.id, capsule.generation
        ):
            self.m.save(
                capsule.with_(
                    state=State.ERROR, reason=f"snapshot generation {capsule.generation} missing"
                )
            )

    async def _vcpus_running(self, vm: VM) -> bool:
        try:
            return await vm.is_running()
        except VMMError:
            return True  # cannot tell: leave it alone; the watchdog watches the process

    async def _run_again(self, capsule: Capsule, vm: VM, why: str) -> None:
        stopped = not await self._vcpus_running(vm)
        async with self.m.envd(capsule, timeout=10) as envd:
            await snapshots.resume_guest(vm, envd, capsule.memory_mib, True, stopped=stopped)
        self.m.event(capsule.id, "adopt", f"{why}; the capsule runs again")

    def _save_running(self, capsule: Capsule, reason: str) -> None:
        extra = {k: v for k, v in capsule.extra.items() if k not in ("capturing", "init_token")}
        self.m.save(capsule.with_(state=State.RUNNING, reason=reason, extra=extra))

    async def _complete_start(self, capsule: Capsule, vm: VM) -> None:
        """A VM restored (or booted) before the agent died: run it and finish /init."""
        with contextlib.suppress(VMMError):
            await vm.cont()
        with contextlib.suppress(VMMError):
            await vm.balloon_set(capsule.memory_mib << 20)
        body = init_body(capsule)
        # envd holds the capsule's token if /init went through, else its snapshot's
        tokens = [capsule.access_token]
        snapshot_token = capsule.extra.get("init_token")
        if isinstance(snapshot_token, str) and snapshot_token != capsule.access_token:
            tokens.append(snapshot_token)
        for token in tokens:
            try:
                async with self.m.envd(capsule, timeout=10, token=token) as envd:
                    await envd.wait_healthy(INIT_DEADLINE_S, vm.alive)
                    await envd.init(**body)
                break
            except EnvdError as exc:
                log.info("re-adopting %s: /init with one token failed: %s", capsule.id, exc)
        else:
            reason = "re-adopted, but envd refused to take the capsule's identity (/init)"
            self.m.event(capsule.id, "error", reason)
            self.m.save(capsule.with_(state=State.ERROR, reason=reason))
            return
        self.m.event(capsule.id, "adopt", f"re-adopted after an interrupted {capsule.state}")
        self._save_running(capsule, "")

    async def _finish_pause(self, capsule: Capsule, vm: VM | None) -> None:
        layout = self.m.layout
        layout.remove_tmp_generations(capsule.id)
        latest = layout.latest_generation(capsule.id)
        if vm is not None:
            await self._run_again(capsule, vm, "pause was interrupted")
            if latest > capsule.generation:
                shutil.rmtree(layout.generation(capsule.id, latest), ignore_errors=True)
            self._save_running(capsule, "pause interrupted by an agent restart")
        elif latest > capsule.generation and layout.generation_ready(capsule.id, latest):
            layout.cleanup_run_files(capsule.id)
            self.m.save(capsule.with_(state=State.PAUSED, pid=None, generation=latest, reason=""))
        else:
            self.m.save(
                capsule.with_(
                    state=State.ERROR, pid=None, reason="the agent and QEMU died during a pause"
                )
            )

    def _remove(self, capsule: Capsule, why: str) -> None:
        self.m.layout.remove(capsule.id)
        self.m.store.delete(capsule.id)
        self.m.event(capsule.id, "destroy", f"removed: {why}")
