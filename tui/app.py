"""The dashboard app: wires the capsule manager and the sampler to the screens, and runs every
capsule operation in a worker so the UI never waits on a VM.

Construction (tests inject what they need; whatever the app makes itself it also closes):
    WrennApp()                                   the user's state dir, a new manager and sampler
    WrennApp(paths)                              another state dir
    WrennApp(paths, manager=m, sampler=s)        both injected: the caller starts and closes them
On exit capsules keep running: only the sampler is stopped and the manager closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import Screen

from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from backend.config import Paths, default_paths
from backend.image.builder import ImageBuilder
from backend.runtime.accel import probe_accel
from backend.sampler import ManagerSource, Sampler
from tui import format as fmt
from tui.commands import CapsuleCommands
from tui.host import HostProbe, probe_host
from tui.sampling import MetricsSampler
from tui.screens.build_image import BuildImageScreen
from tui.screens.confirm import ConfirmScreen
from tui.screens.create import CreateRequest, CreateScreen
from tui.screens.detail import DetailScreen
from tui.screens.help import HelpScreen
from tui.screens.main import MainScreen

log = logging.getLogger("wrenn.tui")
LOG_NAME = "tui.log"


class WrennApp(App[None]):
    TITLE = "wrenn-tui"
    SUB_TITLE = "capsules"
    COMMANDS = App.COMMANDS | {CapsuleCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+q", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self,
        paths: Paths | None = None,
        manager: CapsuleManager | None = None,
        sampler: MetricsSampler | None = None,
        *,
        clock: Callable[[], float] = time.time,
        host_probe: HostProbe = probe_host,
        accel: str | None = None,
        cursor_blink: bool = True,
    ) -> None:
        """`clock`, `host_probe` and `accel` exist so frozen screenshots are repeatable; `accel`
        None means probe it (KVM or TCG) in a worker thread."""
        super().__init__()
        self.paths = paths or (manager.paths if manager is not None else default_paths())
        self._owns_manager = manager is None
        self.manager = manager if manager is not None else CapsuleManager(self.paths)
        self._owns_sampler = sampler is None
        self._heap_frozen = False
        self.sampler: MetricsSampler = (
            sampler
            if sampler is not None
            else Sampler(ManagerSource(self.manager), store=self.manager.store)
        )
        self.clock = clock
        self.host_probe = host_probe
        self.accel = accel
        self.cursor_blink = cursor_blink
        self.operations: dict[str, str] = {}
        """Capsule id -> the operation this dashboard has in flight on it ("pausing", ...)."""
        self.main_screen = MainScreen()
        self._unsubscribe_manager: Callable[[], None] | None = None

    # -- start and stop ---------------------------------------------------------------------

    def on_mount(self) -> None:
        # Pushed rather than returned from get_default_screen, which skips the screen's CSS_PATH.
        self.push_screen(self.main_screen)
        self._unsubscribe_manager = self.manager.subscribe(self._capsule_changed)
        self.start_up()

    @work(exit_on_error=False, group="startup")
    async def start_up(self) -> None:
        if self._owns_manager:
            try:
                adopted = await self.manager.start()
            except Exception as exc:
                self.report_failure("re-adopting capsules", exc)
            else:
                self._announce_adoption(adopted)
            self.capsules_changed()
        if self._owns_sampler:
            await self.sampler.start()
        status = await asyncio.to_thread(ImageBuilder(self.paths).status)
        if status.manifest is None:
            self.offer_image_build()
        if self.accel is None:
            kernel = status.path.resolve() / "vmlinux" if status.present else None
            # Same argument as the manager's, so its later probe is answered from the cache.
            self.accel = (await asyncio.to_thread(probe_accel, kernel)).accel
            self.capsules_changed()
        self.call_after_refresh(self._freeze_heap)

    def _announce_adoption(self, capsules: list[Capsule]) -> None:
        if not capsules:
            return
        states = [c.state for c in capsules]
        parts = [
            f"{states.count(state)} {state.value}"
            for state in (State.RUNNING, State.PAUSED, State.ERROR)
            if state in states
        ]
        noun = "capsule" if len(capsules) == 1 else "capsules"
        self.notify(f"re-adopted {len(capsules)} {noun}: {', '.join(parts)}", title="Agent")
        for capsule in capsules:
            if capsule.state == State.ERROR:
                self.notify(
                    f"{capsule.id}: {capsule.reason}",
                    title="Not re-adopted",
                    severity="warning",
                    markup=False,
                )

    def _freeze_heap(self) -> None:
        """Keep what startup built (modules, Textual, the screens, the first rows) out of
        every later garbage collection. Without this a full collection walks that whole heap
        in the middle of some frame: 60-80 ms measured, enough to hold a keypress past 100 ms;
        with it, ~15 ms. Undone on exit, so a process that runs several apps (the tests)
        collects each one's leftovers."""
        if not self._heap_frozen:
            gc.collect()
            gc.freeze()
            self._heap_frozen = True

    async def on_unmount(self) -> None:
        if self._heap_frozen:
            gc.unfreeze()
            self._heap_frozen = False
        if self._unsubscribe_manager is not None:
            self._unsubscribe_manager()
        try:
            if self._owns_sampler:
                await self.sampler.stop()
        finally:
            if self._owns_manager:
                await self.manager.close()

    def _capsule_changed(self, _capsule: Capsule) -> None:
        self.capsules_changed()

    def capsules_changed(self) -> None:
        """Redraw the table now rather than at the next tick."""
        self.main_screen.capsules_changed()

    def report_failure(self, what: str, exc: BaseException) -> None:
        if isinstance(exc, CapsuleError):
            message = str(exc)
            log.error("%s failed: %s", what, message)
        else:
            message = f"unexpected error while {what}: {exc!r}"
            log.exception("%s failed", what)
        self.notify(
            message,
            title=f"{what.capitalize()} failed",
            severity="error",
            timeout=15,
            markup=False,
        )

    # -- capsule operations -----------------------------------------------------------------

    def request_create(self) -> None:
        if ImageBuilder(self.paths).installed() is None:
            self.offer_image_build()
            return
        self.push_screen(CreateScreen(cursor_blink=self.cursor_blink), self._create_requested)

    def _create_requested(self, request: CreateRequest | None) -> None:
        if request is not None:
            self.create_capsule(request)

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def create_capsule(self, request: CreateRequest) -> Capsule | None:
        network = "" if request.network == "none" else f", network {request.network}"
        self.notify(f"creating a capsule: {request.vcpus} vCPU, {request.memory_mib} MiB{network}")
        try:
            capsule = await self.manager.create(
                memory_mib=request.memory_mib, vcpus=request.vcpus, network=request.network
            )
        except Exception as exc:
            self.report_failure("creating a capsule", exc)
            return None
        finally:
            self.capsules_changed()
        boot_s = capsule.extra.get("boot_s")
        took = f" in {boot_s:.1f} s" if isinstance(boot_s, float) else ""
        self.notify(f"{capsule.id} is running (booted{took})", title="Created")
        return capsule

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def pause_capsule(self, capsule_id: str) -> None:
        with self._operation(capsule_id, "pausing"):
            try:
                snapshot = await self.manager.pause(capsule_id)
            except Exception as exc:
                self.report_failure(f"pausing {capsule_id}", exc)
                return
        self.notify(
            f"{capsule_id}: snapshot {fmt.size(snapshot.total_allocated)} "
            f"in {snapshot.pause_seconds:.1f} s",
            title="Paused",
        )

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def resume_capsule(self, capsule_id: str) -> None:
        with self._operation(capsule_id, "resuming"):
            try:
                capsule = await self.manager.resume(capsule_id)
            except Exception as exc:
                self.report_failure(f"resuming {capsule_id}", exc)
                return
        resume_s = capsule.extra.get("resume_s")
        took = f" in {resume_s:.1f} s" if isinstance(resume_s, float) else ""
        self.notify(f"{capsule_id} is running again{took}", title="Resumed")

    def request_destroy(self, capsule_id: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.destroy_capsule(capsule_id)

        self.push_screen(
            ConfirmScreen(
                f"Destroy {capsule_id}?",
                "Its VM is killed and its disk and snapshots are deleted. This cannot be undone.",
                "Destroy",
            ),
            answered,
        )

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def destroy_capsule(self, capsule_id: str) -> None:
        with self._operation(capsule_id, "destroying"):
            try:
                await self.manager.destroy(capsule_id)
            except Exception as exc:
                self.report_failure(f"destroying {capsule_id}", exc)
                return
        self.sampler.forget(capsule_id)
        self.notify(f"{capsule_id} destroyed", title="Destroyed")

    @contextlib.contextmanager
    def _operation(self, capsule_id: str, name: str) -> Iterator[None]:
        """Marks the capsule busy in the table (and its keys disabled) while `name` runs."""
        self.operations[capsule_id] = name
        self.capsules_changed()
        try:
            yield
        finally:
            self.operations.pop(capsule_id, None)
            self.capsules_changed()

    # -- quitting ---------------------------------------------------------------------------

    async def action_quit(self) -> None:
        busy = [w for w in self.workers if w.group == "lifecycle" and not w.is_finished]
        if not busy:
            self.exit()
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.exit()

        count = f"{len(busy)} operation{'s' if len(busy) != 1 else ''}"
        self.push_screen(
            ConfirmScreen(
                "Quit now?",
                f"{count} still running. Quitting interrupts them; the capsules are left "
                "as they are and the next start re-adopts them.",
                "Quit",
            ),
            answered,
        )

    # -- screens ----------------------------------------------------------------------------

    def offer_image_build(self) -> None:
        if not isinstance(self.screen, BuildImageScreen):
            self.push_screen(BuildImageScreen(self.paths))

    def show_details(self, capsule_id: str) -> None:
        self.push_screen(DetailScreen(capsule_id))

    def show_help(self, screen: Screen[Any]) -> None:
        keys: list[tuple[str, str]] = []
        seen = set()
        for binding in (active.binding for active in screen.active_bindings.values()):
            if binding.description and binding.action not in seen:
                seen.add(binding.action)
                keys.append((self.get_key_display(binding), binding.description))
        keys.append((self.COMMAND_PALETTE_BINDING, "Command palette"))
        self.push_screen(HelpScreen(keys))


def run_dashboard() -> None:
    paths = default_paths()
    paths.ensure()
    # A traceback on stderr would tear through the screen: log lines go to a file instead.
    logging.basicConfig(
        filename=paths.state / LOG_NAME,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    WrennApp(paths).run()
