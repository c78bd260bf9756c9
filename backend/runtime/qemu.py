"""QEMU on the microvm machine, driven over QMP with `qemu.qmp`.

The device list is fixed (restore needs the identical list and order): virtio-blk (the capsule's
qcow2 overlay), virtio-net on user-mode networking with one host forward to envd on 127.0.0.1,
a balloon with deflate-on-oom and free-page reporting, virtio-rng (without it Python blocks on
entropy at boot), serial console to a file. Guest RAM is a shared file under /dev/shm: pausing
saves only the device state (`x-ignore-shared`) and copies that file.

Metadata channel: a QEMU fw_cfg file (backend/envd/protocol.py: METADATA_FW_CFG_NAME), the
JSON document padded to a fixed size, written 0600 in the capsule's private run dir and read by
QEMU at start (before it drops to its own user). The guest's `qemu_fw_cfg` driver shows it as a
root-only sysfs file that envd polls: no network address, and no host process per read (the
former `guestfwd` command spawned one per guest connection). Metadata is fixed per QEMU
process; every resume starts a new one with fresh metadata.

Device state is migrated through file descriptors the agent opens and passes over QMP
(`getfd`), never through `exec:` commands, so a QEMU that dropped privileges (`-runas`) can
still save and load snapshots in the agent's private directories.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from qemu.qmp import ExecuteError, QMPClient, QMPError

from backend.envd.protocol import METADATA_FW_CFG_NAME, METADATA_FW_CFG_SIZE
from backend.libc import libc
from backend.runtime.accel import QEMU_BINARY
from backend.runtime.base import (
    BalloonStats,
    MigrationFailed,
    VMConfig,
    VMMCommandError,
    VMMError,
    VMMGone,
)

QMP_CONNECT_TIMEOUT_S = 10.0
BALLOON_POLL_INTERVAL_S = 5
MIGRATION_BANDWIDTH = 16 << 30
MIGRATION_FD = "wrenn-migration"
AGENT_SERIAL = "wrenn-agent"
"""The agent disk's virtio serial (assets/guest/stage1-init finds the disk by it)."""


def host_tsc_khz() -> int:
    """The host TSC frequency; microvm has no HPET/PM timer, so the guest must be told."""
    try:
        return int(Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz").read_text())
    except (OSError, ValueError):
        pass
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return 2_000_000


TCG_GUEST_APPEND: tuple[str, ...] = ("norandmaps",)
"""Guest kernel options under TCG only. `norandmaps`: no address-space randomisation for the
guest's processes. TCG finds translated code by the guest's virtual address, so with
randomisation every new process (every exec) maps ld.so, libc and its program at fresh
addresses and QEMU translates all of it again: ~8 MiB more translation buffer per `exec`
(the 64 MiB buffer full after four, then flushed and refilled) and twice the time per exec.
The VM is the isolation boundary, not the guest's ASLR; KVM runs guest code natively and
keeps it. Applied at boot: a template snapshot keeps what it was booted with."""


def build_argv(config: VMConfig, incoming: bool = False) -> list[str]:
    c = config
    guest: tuple[str, ...] = ()
    if c.accel == "kvm":
        accel, cpu = ["-accel", "kvm"], "host"
    else:
        accel, cpu = ["-accel", "tcg,thread=multi,tb-size=64"], "qemu64,+arat"
        guest = TCG_GUEST_APPEND
    append = [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        f"tsc_early_khz={host_tsc_khz()}",
        "tsc=reliable",
        "8250.nr_uarts=1",
        # freed pages are zeroed when freed (and not again when allocated): a clone's pause
        # then finds the memory its guest freed equal to the template's (holes) or zero, and
        # saves none of it (issue 21)
        "init_on_free=1",
        *guest,
        *c.extra_append,
    ]
    netdev = (
        f"user,id=n0,restrict={'on' if c.network == 'none' else 'off'},"
        f"hostfwd=tcp:{c.forward_host}:{c.host_port}-:{c.guest_port}"
    )
    argv = [
        QEMU_BINARY,
        *accel,
        "-M",
        "microvm,memory-backend=mem0",
        "-cpu",
        cpu,
        "-m",
        f"{c.memory_mib}M",
        "-smp",
        str(c.vcpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        str(c.kernel),
        "-initrd",
        str(c.initrd),
        "-append",
        " ".join(append),
        "-object",
        _memory_backend(c),
        # auto-read-only=off: QEMU keeps the descriptor it opened (as the agent) for the life
        # of the VM; with it on, a pause's block inactivation re-opens the overlay by path,
        # which QEMU's own user cannot reach
        "-drive",
        f"file={c.disk},if=none,id=d0,format=qcow2,cache=writeback,discard=unmap,"
        "auto-read-only=off",
        "-device",
        "virtio-blk-device,drive=d0",
        *_agent_drive(c),
        "-netdev",
        netdev,
        "-device",
        "virtio-net-device,netdev=n0",
        *_balloon(c),
        "-device",
        "virtio-rng-device",
        "-qmp",
        f"unix:{c.qmp_socket},server=on,wait=off",
        # append=on: once the agent has rotated the log (cap_console), QEMU's next write lands
        # at the new end, not at its old offset (which would leave a file as large as before)
        "-chardev",
        "file,id=console0,append=on,path=" + str(c.console_log).replace(",", ",,"),
        "-serial",
        "chardev:console0",
        "-fw_cfg",
        f"name={METADATA_FW_CFG_NAME},file=" + str(metadata_blob(c)).replace(",", ",,"),
        "-name",
        f"wrenn-{c.capsule_id},process=wrenn-{c.capsule_id}",
    ]
    # seccomp: no obsolete system calls, and QEMU never starts a process (nothing it does
    # needs one since the metadata is a fw_cfg file)
    argv += ["-sandbox", "on,obsolete=deny,spawn=deny"]
    user = qemu_user()
    if user is not None:
        # QEMU opens its files, sockets and devices as the agent, then drops to this user
        # before the guest runs.
        argv += ["-runas", user.pw_name]
    if incoming:
        argv += ["-incoming", "defer"]
    if c.netns is not None:
        # `ip netns exec` execs QEMU in place: the pid stays QEMU's
        argv = ["ip", "netns", "exec", c.netns, *argv]
    return argv


def _memory_backend(c: VMConfig) -> str:
    """Guest RAM: the capsule's shared file, or a private mapping of a template's sealed
    memfd (`ram_private_base`; its pages stay shared until the guest writes them)."""
    if c.ram_private_base is not None:
        path = c.ram_private_base.replace(",", ",,")
        return f"memory-backend-file,id=mem0,size={c.memory_mib}M,mem-path={path},share=off"
    return f"memory-backend-file,id=mem0,size={c.memory_mib}M,mem-path={c.ram_file},share=on"


def _balloon(c: VMConfig) -> list[str]:
    device = "virtio-balloon-device,id=balloon0,deflate-on-oom=on,free-page-reporting=on"
    if not c.free_page_hint:
        return ["-device", device]
    return [
        "-object",
        "iothread,id=balloon-io",
        "-device",
        f"{device},free-page-hint=on,iothread=balloon-io",
    ]


def _agent_drive(c: VMConfig) -> list[str]:
    """The agent disk, read-only, told apart from the capsule's disk by its serial (stage 1
    looks for it). Device order is part of what a snapshot needs, so it always comes here."""
    if c.agent_disk is None:
        return []
    path = str(c.agent_disk).replace(",", ",,")
    return [
        "-drive",
        f"file={path},if=none,id=d1,format=raw,readonly=on,auto-read-only=off",
        "-device",
        f"virtio-blk-device,drive=d1,serial={AGENT_SERIAL}",
    ]


def pid_is_vm(pid: int, config: VMConfig) -> bool:
    """True when `pid` is a live QEMU serving this capsule's QMP socket (not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and cmdline[0].endswith(QEMU_BINARY.encode())
        and f"unix:{config.qmp_socket},server=on,wait=off".encode() in cmdline
    )


class QemuVM:
    """One QEMU process (implements backend.runtime.base.VM). QMP accepts one client at a
    time, and the dashboard and the CLI may both drive a capsule, so a connection is opened
    per operation (`session`), never held."""

    def __init__(
        self, config: VMConfig, pid: int, process: subprocess.Popen[bytes] | None = None
    ) -> None:
        self._config = config
        self._pid = pid
        self._process = process
        self._qmp: QMPClient | None = None
        self._lock = asyncio.Lock()

    @property
    def config(self) -> VMConfig:
        return self._config

    @property
    def pid(self) -> int:
        return self._pid

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[QemuVM]:
        """Hold one QMP connection for a sequence of commands."""
        async with self._lock:
            self._qmp = await _connect_qmp(self.config, self.alive, QMP_CONNECT_TIMEOUT_S)
            try:
                yield self
            finally:
                qmp, self._qmp = self._qmp, None
                with contextlib.suppress(QMPError, OSError, EOFError, asyncio.TimeoutError):
                    await asyncio.wait_for(qmp.disconnect(), 5)

    def alive(self) -> bool:
        if self._process is not None:
            return self._process.poll() is None
        return pid_is_vm(self._pid, self.config)

    async def execute(self, command: str, arguments: dict[str, object] | None = None) -> object:
        """Run one QMP command (inside `session`, or in a connection of its own)."""
        if self._qmp is None:
            async with self.session():
                return await self.execute(command, arguments)
        try:
            return await asyncio.wait_for(self._qmp.execute(command, arguments), 30)
        except ExecuteError as exc:
            raise VMMCommandError(command, exc.error_class, str(exc)) from exc
        except TimeoutError as exc:
            raise VMMError(f"QMP {command} got no answer within 30 s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise VMMGone(f"QMP {command} failed: QEMU went away ({exc})") from exc

    async def is_running(self) -> bool:
        result = await self.execute("query-status")
        assert isinstance(result, dict)
        return bool(result.get("running"))

    async def stop(self) -> None:
        await self.execute("stop")

    async def cont(self) -> None:
        await self.execute("cont")

    async def snapshot_create(self, device_state: Path) -> None:
        """Save device state only: RAM is a shared file, skipped by `x-ignore-shared`."""
        if self._qmp is None:
            async with self.session():
                return await self.snapshot_create(device_state)
        fd = os.open(device_state, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            await self.save_to_fd(fd, "saving device state")
        finally:
            os.close(fd)

    async def save_to_fd(self, fd: int, what: str) -> None:
        """Migrate (a stopped VM) into `fd`, which QEMU gets a copy of (`getfd`): a file, or
        a pipe whose reader filters the stream (backend/capsules/ramdiff.py)."""
        if self._qmp is None:
            async with self.session():
                return await self.save_to_fd(fd, what)
        await self.set_migration_capabilities()
        await self.execute("migrate-set-parameters", {"max-bandwidth": MIGRATION_BANDWIDTH})
        await self.pass_fd(fd, MIGRATION_FD)
        await self.migrate("migrate", {"uri": f"fd:{MIGRATION_FD}"}, what)

    async def set_migration_capabilities(self) -> None:
        """Device state only (guest RAM is the shared file, copied by the agent), and MIGRATION
        events to wait on instead of polling."""
        await self.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": "x-ignore-shared", "state": True},
                    {"capability": "events", "state": True},
                ]
            },
        )

    async def migrate(
        self, command: str, arguments: dict[str, object], what: str, timeout: float = 60.0
    ) -> None:
        """Start a migration in either direction and wait for its MIGRATION event saying it
        completed; MigrationFailed if it fails, QEMU dies or it takes over `timeout`."""
        assert self._qmp is not None, "migrate needs a session"
        deadline = time.monotonic() + timeout
        with self._qmp.listener("MIGRATION") as events:
            await self.execute(command, arguments)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    with contextlib.suppress(VMMError):
                        await self.execute("migrate_cancel")
                    raise MigrationFailed(f"{what} timed out after {timeout:.0f} s")
                try:
                    event = await asyncio.wait_for(events.get(), min(remaining, 0.5))
                    data = event["data"]
                    status = data.get("status") if isinstance(data, dict) else None
                except TimeoutError:
                    # No event for a while: make sure QEMU is still there to send one.
                    if not self.alive():
                        raise MigrationFailed(
                            f"{what} failed: QEMU exited {_vmm_log_tail(self.config)}"
                        ) from None
                    continue
                if status == "completed":
                    return
                if status in ("failed", "cancelled"):
                    info = await self.execute("query-migrate")
                    desc = info.get("error-desc", status) if isinstance(info, dict) else status
                    raise MigrationFailed(f"{what} failed: {desc} {_vmm_log_tail(self.config)}")

    async def pass_fd(self, fd: int, name: str) -> None:
        """Hand QEMU an open file descriptor under `name` (QMP `getfd`)."""
        assert self._qmp is not None, "pass_fd needs a session"
        try:
            self._qmp.send_fd_scm(fd)
        except (QMPError, OSError) as exc:
            raise VMMGone(f"passing a file descriptor to QEMU failed: {exc}") from exc
        await self.execute("getfd", {"fdname": name})

    async def balloon_stats(self) -> BalloonStats:
        if self._qmp is None:
            async with self.session():
                return await self.balloon_stats()
        raw = await self.execute(
            "qom-get", {"path": "/machine/peripheral/balloon0", "property": "guest-stats"}
        )
        info = await self.execute("query-balloon")
        assert isinstance(raw, dict) and isinstance(info, dict)
        stats = raw.get("stats", {})

        def stat(key: str) -> int | None:
            value = stats.get(key)
            return int(value) if isinstance(value, int) and value >= 0 else None

        return BalloonStats(
            actual=int(info["actual"]) if "actual" in info else None,
            free=stat("stat-free-memory"),
            total=stat("stat-total-memory"),
            available=stat("stat-available-memory"),
            disk_caches=stat("stat-disk-caches"),
            last_update=int(raw["last-update"]) if raw.get("last-update") else None,
        )

    async def balloon_actual(self) -> int:
        """The guest's current memory size in bytes (RAM minus the balloon)."""
        info = await self.execute("query-balloon")
        assert isinstance(info, dict)
        return int(info["actual"])

    async def balloon_set(self, target_bytes: int) -> None:
        """Ask the guest to inflate/deflate the balloon until its memory is `target_bytes`."""
        await self.execute("balloon", {"value": int(target_bytes)})

    async def quit(self) -> None:
        with contextlib.suppress(VMMError):
            await self.execute("quit")
        await self.wait_exit(5.0)
        if self.alive():
            self.kill()
            await self.wait_exit(5.0)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> bool:
        if self.alive():
            await _wait_pid(self._pid, timeout)
        if self.alive():
            return False
        if self._process is not None:
            self._process.wait()
        return True


async def _wait_pid(pid: int, timeout: float) -> None:
    """Wait until `pid` exits (or `timeout` passes), woken by a pidfd instead of polling."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    loop = asyncio.get_running_loop()
    exited: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not exited.done():
            exited.set_result(None)

    loop.add_reader(fd, readable)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(exited, timeout)
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _connect_qmp(config: VMConfig, is_alive: Callable[[], bool], timeout: float) -> QMPClient:
    client = QMPClient(f"wrenn-{config.capsule_id}")
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not is_alive():
            break
        if config.qmp_socket.exists():
            try:
                await asyncio.wait_for(client.connect(str(config.qmp_socket)), 5)
                return client
            except (TimeoutError, QMPError, OSError) as exc:
                last = exc
        await asyncio.sleep(0.02)
    raise VMMGone(f"cannot connect to QEMU's QMP socket {config.qmp_socket}: {last or 'exited'}")


def _vmm_log_tail(config: VMConfig) -> str:
    try:
        return config.vmm_log.read_text(errors="replace").strip()[-800:]
    except OSError:
        return ""


QEMU_USER = "wrenn-qemu"
"""The unprivileged account QEMU runs as when the agent is root (scripts/setup.sh makes it)."""


def qemu_user() -> pwd.struct_passwd | None:
    """The account QEMU drops to: QEMU_USER when the agent runs as root and it exists (an
    agent that is not root already runs QEMU with no privileges but its own)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(QEMU_USER)
    except KeyError:
        return None


def metadata_blob(config: VMConfig) -> Path:
    return config.run_dir / "metadata.fwcfg"


def write_metadata_blob(config: VMConfig) -> None:
    """The guest's metadata document as its fw_cfg file: compact JSON padded with spaces to
    METADATA_FW_CFG_SIZE, 0600 (it holds the first access token), replaced atomically."""
    compact = json.dumps(json.loads(config.metadata_json), separators=(",", ":")).encode()
    if len(compact) >= METADATA_FW_CFG_SIZE:
        raise VMMError(
            f"metadata document is {len(compact)} bytes; the limit is {METADATA_FW_CFG_SIZE - 1}"
        )
    path = metadata_blob(config)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, compact.ljust(METADATA_FW_CFG_SIZE - 1) + b"\n")
    finally:
        os.close(fd)
    tmp.rename(path)


PR_SET_THP_DISABLE = 41


def _child_setup() -> None:
    """In QEMU's process before exec: guest RAM and sockets private to the user, and no
    transparent huge pages for its own memory (inherited across exec). QEMU asks for huge
    pages for TCG's translation buffer: an idle TCG capsule then held 20 MiB of it in ten
    2 MiB pages, where the code it had translated needed far less (issue 21)."""
    os.umask(0o077)
    libc().prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0)


class QemuRuntime:
    """Implements backend.runtime.base.Runtime with QEMU's microvm machine."""

    name = "qemu"

    def __init__(self, accel: str) -> None:
        self.accel = accel

    def _spawn(self, config: VMConfig, incoming: bool) -> subprocess.Popen[bytes]:
        config.run_dir.mkdir(parents=True, exist_ok=True)
        config.qmp_socket.unlink(missing_ok=True)
        write_metadata_blob(config)
        libc()  # loaded before the fork: the child only calls into it
        log = config.vmm_log.open("ab")
        try:
            proc = subprocess.Popen(
                build_argv(config, incoming),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # its own session: the VM outlives the agent (and a ctrl+c in the dashboard)
                start_new_session=True,
                # guest RAM and sockets are private to the user
                preexec_fn=_child_setup,
            )
        except FileNotFoundError as exc:
            raise VMMError(
                "QEMU not found: run `make setup`, or apt-get install qemu-system-x86"
            ) from exc
        finally:
            log.close()
        config.pid_file.write_text(f"{proc.pid}\n")
        return proc

    async def _start(self, config: VMConfig, incoming: bool) -> QemuVM:
        proc = self._spawn(config, incoming)
        vm = QemuVM(config, proc.pid, proc)
        try:
            async with vm.session():
                await vm.execute("query-status")
        except VMMError as exc:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
            raise VMMError(f"QEMU failed to start: {_vmm_log_tail(config) or exc}") from exc
        with contextlib.suppress(VMMError):
            await vm.execute(
                "qom-set",
                {
                    "path": "/machine/peripheral/balloon0",
                    "property": "guest-stats-polling-interval",
                    "value": BALLOON_POLL_INTERVAL_S,
                },
            )
        return vm

    async def create(self, config: VMConfig) -> QemuVM:
        return await self._start(config, incoming=False)

    async def restore(
        self, config: VMConfig, device_state: Path, ready: Awaitable[None] | None = None
    ) -> QemuVM:
        """Start QEMU waiting for a device state, load it and run the VM.

        `ready` (e.g. the RAM file still being filled) runs while QEMU starts; the state is
        loaded only after it completes, and if it fails QEMU is killed and the error raised.
        """
        pending = asyncio.ensure_future(ready) if ready is not None else None
        try:
            vm = await self._start(config, incoming=True)
        except BaseException:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending
            raise
        try:
            if pending is not None:
                await pending
            async with vm.session():
                await self._incoming(vm, device_state)
        except BaseException:
            vm.kill()
            await vm.wait_exit(5)
            raise
        return vm

    async def _incoming(self, vm: QemuVM, device_state: Path) -> None:
        await vm.set_migration_capabilities()
        fd = os.open(device_state, os.O_RDONLY)
        try:
            await vm.pass_fd(fd, MIGRATION_FD)
        finally:
            os.close(fd)
        await vm.migrate(
            "migrate-incoming", {"uri": f"fd:{MIGRATION_FD}"}, "restoring device state"
        )
        await vm.cont()

    def attach(self, config: VMConfig, pid: int | None) -> QemuVM | None:
        if pid is None or not pid_is_vm(pid, config):
            return None
        return QemuVM(config, pid)
