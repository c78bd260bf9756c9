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
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from textual import work
from textual.app import App
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.validation import Integer

from backend.capsules.actions import Action, allowed
from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.capsules.models import Capsule, State
from backend.config import Paths, default_paths
from backend.dashboard import MAX_FORK, ManagerPort
from backend.sampler import ManagerSource, Sampler
from tui import format as fmt
from tui import messages as msg
from tui.commands import CapsuleCommands
from tui.context import Dashboard
from tui.host import HostReader, capacity, capsule_costs, probe_host
from tui.sampling import MetricsSampler
from tui.screens.build_image import BuildImageScreen
from tui.screens.confirm import ConfirmScreen
from tui.screens.create import CreateRequest, CreateScreen
from tui.screens.detail import DetailScreen
from tui.screens.help import HelpScreen
from tui.screens.host import HostReport, HostScreen
from tui.screens.main import MainScreen
from tui.screens.prompt import PromptScreen
from tui.screens.templates import TemplatesScreen

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
        host_probe: HostReader | None = None,
        accel: str | None = None,
        cursor_blink: bool = True,
    ) -> None:
        """`clock`, `host_probe` and `accel` exist so frozen screenshots are repeatable; `accel`
        None means probe it (KVM or TCG) in a worker thread."""
        super().__init__()
        self.paths = paths or (manager.paths if manager is not None else default_paths())
        self._owns_manager = manager is None
        self.manager = manager if manager is not None else CapsuleManager(self.paths)
        self.backend = ManagerPort(self.manager)
        """Everything the dashboard asks of the backend goes through this port."""
        self._owns_sampler = sampler is None
        self._heap_frozen = False
        self.sampler: MetricsSampler = (
            sampler
            if sampler is not None
            else Sampler(ManagerSource(self.manager), store=self.manager.store)
        )
        self.clock = clock
        self.host_probe: HostReader = host_probe or functools.partial(probe_host, self.paths.state)
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
        self._unsubscribe_manager = self.backend.subscribe(self._capsule_changed)
        self.start_up()

    @work(exit_on_error=False, group="startup")
    async def start_up(self) -> None:
        if self._owns_manager:
            try:
                adopted = await self.backend.start()
            except Exception as exc:
                self.report_failure("re-adopting capsules", exc)
            else:
                self._announce_adoption(adopted)
            self.capsules_changed()
        if self._owns_sampler:
            await self.sampler.start()
        if not await asyncio.to_thread(self.backend.image_present):
            self.offer_image_build()
        if self.accel is None:
            self.accel = await self.backend.accel()
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
                await self.backend.close()

    def _capsule_changed(self, capsule: Capsule) -> None:
        self.main_screen.post_message(msg.CapsuleChanged(capsule))

    def capsules_changed(self) -> None:
        """Have the main screen read the capsule list again now rather than at the next tick."""
        self.main_screen.post_message(msg.CapsulesStale())

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

    # -- what the screens ask for ----------------------------------------------------------

    def on_create_requested(self, message: msg.CreateRequested) -> None:
        self.request_create(message.template)

    def on_pause_requested(self, message: msg.PauseRequested) -> None:
        if self._applies(message.capsule_id, Action.PAUSE):
            self.pause_capsule(message.capsule_id)

    def on_resume_requested(self, message: msg.ResumeRequested) -> None:
        if self._applies(message.capsule_id, Action.RESUME):
            self.resume_capsule(message.capsule_id)

    def on_destroy_requested(self, message: msg.DestroyRequested) -> None:
        if self._applies(message.capsule_id, Action.DESTROY):
            self.request_destroy(message.capsule_id)

    def on_details_requested(self, message: msg.DetailsRequested) -> None:
        self.show_details(message.capsule_id)

    def on_template_requested(self, message: msg.TemplateRequested) -> None:
        if self._applies(message.capsule_id, Action.TEMPLATE):
            self.request_template(message.capsule_id)

    def on_fork_requested(self, message: msg.ForkRequested) -> None:
        if self._applies(message.capsule_id, Action.FORK):
            self.request_fork(message.capsule_id)

    def on_templates_requested(self, _: msg.TemplatesRequested) -> None:
        self.show_templates()

    def on_template_remove_requested(self, message: msg.TemplateRemoveRequested) -> None:
        self.request_template_remove(message.name)

    def on_host_requested(self, _: msg.HostRequested) -> None:
        if not isinstance(self.screen, HostScreen):
            self.push_screen(HostScreen())

    def on_host_refresh_wanted(self, _: msg.HostRefreshWanted) -> None:
        self.measure_host()

    def on_free_space_requested(self, _: msg.FreeSpaceRequested) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.free_space()

        self.push_screen(
            ConfirmScreen(
                "Free space?",
                "Removes RAM files of capsules that have no VM, half-written snapshots and "
                "work directories no process holds. Nothing a capsule or template needs is "
                "touched (each is checked again under its capsule's lock).",
                "Free",
            ),
            answered,
        )

    def on_templates_refresh_wanted(self, _: msg.TemplatesRefreshWanted) -> None:
        self.templates_changed()

    def on_help_requested(self, _: msg.HelpRequested) -> None:
        self.show_help(self.screen)

    def on_image_build_requested(self, _: msg.ImageBuildRequested) -> None:
        self.offer_image_build()

    def _applies(self, capsule_id: str, action: Action) -> bool:
        """The state -> allowed actions rule (backend/capsules/actions.py), checked again here
        because a key press can race a state change; says why when it does not apply."""
        if capsule_id in self.operations:
            self.notify(f"{capsule_id} is busy {self.operations[capsule_id]}", severity="warning")
            return False
        try:
            capsule = self.backend.get(capsule_id)
        except CapsuleError as exc:
            self.report_failure(f"{action} {capsule_id}", exc)
            return False
        if not allowed(capsule.state, action):
            self.notify(
                f"cannot {action} {capsule_id}: it is {capsule.state}",
                severity="warning",
                markup=False,
            )
            return False
        return True

    # -- the host -----------------------------------------------------------------------------

    @work(exclusive=True, exit_on_error=False, group="host")
    async def measure_host(self) -> None:
        screens = [s for s in self.screen_stack if isinstance(s, HostScreen)]
        if not screens:
            return
        try:
            usage = await self.backend.disk_usage()
            capsules = self.backend.list_capsules()
        except Exception as exc:
            self.report_failure("measuring the host", exc)
            return
        running = [c for c in capsules if c.state == State.RUNNING]
        host = self.host_probe()
        report = HostReport(
            host=host,
            room=capacity(
                host,
                (cost.total for cost in capsule_costs(self.backend, self.sampler).values()),
                self.backend.default_memory_mib,
            ),
            running=len(running),
            default_mib=self.backend.default_memory_mib,
            usage=usage,
            sampler=self.sampler.stats,
        )
        for screen in screens:
            screen.show(report)

    @work(exclusive=True, exit_on_error=False, group="host-free")
    async def free_space(self) -> None:
        try:
            removed = await self.backend.free_space()
        except Exception as exc:
            self.report_failure("freeing space", exc)
            return
        finally:
            self.measure_host()
        total = sum(item.size for item in removed)
        self.notify(f"freed {fmt.size(total)} ({len(removed)} items)", title="Space freed")

    # -- capsule operations -----------------------------------------------------------------

    def request_create(self, template: str | None = None) -> None:
        if not self.backend.image_present():
            self.offer_image_build()
            return
        try:
            templates = self.backend.templates()
        except Exception as exc:
            self.report_failure("listing the templates", exc)
            return
        self.push_screen(
            CreateScreen(
                templates,
                self.backend.network_modes,
                template=template,
                cursor_blink=self.cursor_blink,
            ),
            self._create_requested,
        )

    def _create_requested(self, request: CreateRequest | None) -> None:
        if request is not None:
            self.create_capsule(request)

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def create_capsule(self, request: CreateRequest) -> Capsule | None:
        if request.saved_template:
            self.notify(f"creating a capsule from template {request.template}")
        else:
            network = "" if request.network == "none" else f", network {request.network}"
            origin = "" if request.template == "default" else f" from {request.template}"
            self.notify(
                f"creating a capsule{origin}: {request.vcpus} vCPU, "
                f"{request.memory_mib} MiB{network}"
            )
        try:
            if request.saved_template:
                capsule = await self.backend.create(request.template, None, None, None)
            else:
                capsule = await self.backend.create(
                    request.template, request.memory_mib, request.vcpus, request.network
                )
        except Exception as exc:
            self.report_failure("creating a capsule", exc)
            return None
        finally:
            self.capsules_changed()
            self.templates_changed()
        boot_s = capsule.extra.get("boot_s")
        took = f" in {boot_s:.1f} s" if isinstance(boot_s, float) else ""
        how = "started" if request.saved_template else "booted"
        self.notify(f"{capsule.id} is running ({how}{took})", title="Created")
        return capsule

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def pause_capsule(self, capsule_id: str) -> None:
        with self._operation(capsule_id, "pausing"):
            try:
                snapshot = await self.backend.pause(capsule_id)
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
                capsule = await self.backend.resume(capsule_id)
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
                await self.backend.destroy(capsule_id)
            except Exception as exc:
                self.report_failure(f"destroying {capsule_id}", exc)
                return
        self.sampler.forget(capsule_id)
        self.notify(f"{capsule_id} destroyed", title="Destroyed")
        self.templates_changed()

    # -- templates and forks ------------------------------------------------------------------

    def request_template(self, capsule_id: str) -> None:
        def answered(name: str | None) -> None:
            if name:
                self.save_template(capsule_id, name)

        self.push_screen(
            PromptScreen(
                f"Save {capsule_id} as a template",
                "Its memory, processes and disk as they are now; new capsules start from it. "
                "A running capsule stops only while its state is copied.",
                placeholder="name: a-z 0-9 . _ - (up to 63)",
                confirm_label="Save",
                cursor_blink=self.cursor_blink,
            ),
            answered,
        )

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def save_template(self, capsule_id: str, name: str) -> None:
        with self._operation(capsule_id, "saving"):
            try:
                template = await self.backend.template_create(capsule_id, name)
            except Exception as exc:
                self.report_failure(f"saving {capsule_id} as template {name!r}", exc)
                return
        self.notify(
            f"{capsule_id} saved as template {template.name} ({fmt.size(template.allocated)})",
            title="Template saved",
            markup=False,
        )
        self.templates_changed()

    def request_fork(self, capsule_id: str) -> None:
        def answered(count: str | None) -> None:
            if count:
                self.fork_capsule(capsule_id, int(count))

        self.push_screen(
            PromptScreen(
                f"Fork {capsule_id}",
                f"New capsules with its memory and disk at one instant; it keeps running. "
                f"How many (1 to {MAX_FORK})?",
                value="1",
                validator=Integer(
                    1, MAX_FORK, failure_description=f"a whole number from 1 to {MAX_FORK}"
                ),
                confirm_label="Fork",
                cursor_blink=self.cursor_blink,
            ),
            answered,
        )

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def fork_capsule(self, capsule_id: str, count: int) -> list[Capsule]:
        with self._operation(capsule_id, "forking"):
            try:
                clones = await self.backend.fork(capsule_id, count)
            except Exception as exc:
                self.report_failure(f"forking {capsule_id}", exc)
                return []
            finally:
                self.capsules_changed()
                self.templates_changed()
        self.notify(
            f"{capsule_id} forked: {', '.join(c.id for c in clones)}", title="Forked", markup=False
        )
        return clones

    def show_templates(self) -> None:
        if isinstance(self.screen, TemplatesScreen):
            return
        try:
            templates = self.backend.templates()
        except Exception as exc:
            self.report_failure("listing the templates", exc)
            return
        self.push_screen(TemplatesScreen(templates))

    def templates_changed(self) -> None:
        """Redraw an open templates view (a template saved or removed, its users changed)."""
        for screen in self.screen_stack:
            if isinstance(screen, TemplatesScreen):
                try:
                    screen.show(self.backend.templates())
                except Exception as exc:
                    self.report_failure("listing the templates", exc)

    def request_template_remove(self, name: str) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.remove_template(name)

        self.push_screen(
            ConfirmScreen(
                f"Delete template {name}?",
                "Its disk, memory and device state are deleted; capsules can no longer start "
                "from it. A template capsules still use is kept.",
                "Delete",
            ),
            answered,
        )

    @work(exclusive=False, exit_on_error=False, group="lifecycle")
    async def remove_template(self, name: str) -> None:
        try:
            await self.backend.template_remove(name)
        except Exception as exc:
            self.report_failure(f"deleting template {name!r}", exc)
            return
        finally:
            self.templates_changed()
        self.notify(f"template {name} deleted", title="Deleted", markup=False)

    @contextlib.contextmanager
    def _operation(self, capsule_id: str, name: str) -> Iterator[None]:
        """Marks the capsule busy in the table (and its keys disabled) while `name` runs."""
        self.operations[capsule_id] = name
        self.main_screen.post_message(msg.OperationChanged(capsule_id, name))
        try:
            yield
        finally:
            self.operations.pop(capsule_id, None)
            self.main_screen.post_message(msg.OperationChanged(capsule_id, None))

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
            self.push_screen(BuildImageScreen(self.backend))

    def show_details(self, capsule_id: str) -> None:
        self.push_screen(DetailScreen(capsule_id))

    def show_help(self, screen: Screen[Any]) -> None:
        keys: list[tuple[str, str]] = []
        seen = set()
        # the screen's own keys first, then the focused widget's (cursor movement and such)
        own = {b.action for b in type(screen).BINDINGS if isinstance(b, Binding)}
        actives = sorted(
            screen.active_bindings.values(),
            key=lambda a: not (a.node is screen and a.binding.action in own),
        )
        for binding in (active.binding for active in actives):
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


def _is_a_dashboard(app: WrennApp) -> Dashboard:
    """Never called: mypy checks here that the app gives the screens what they read."""
    return app
