"""Network isolation with real capsules: untrusted code reaches neither the host nor other
capsules; the internet mode reaches outside only through NAT (to a server in a network
namespace the test makes, never a real outside address)."""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from backend.capsules.errors import CapsuleError
from backend.capsules.manager import CapsuleManager
from backend.envd import protocol as wire
from backend.runtime import network as net
from backend.runtime.network import internet_unavailable_reason

pytestmark = pytest.mark.vm

PROBE = """python3 - <<'EOF'
import socket
for host, port in {targets!r}:
    s = socket.socket()
    s.settimeout(2)
    try:
        s.connect((host, port))
        print(host, port, "open")
    except OSError as e:
        print(host, port, "blocked", e)
EOF"""


class Listener:
    """A TCP server on the host that records who connected."""

    def __init__(self, host: str, netns: str | None = None) -> None:
        self.host = host
        if netns is None:
            self.sock = socket.socket()
            self.sock.bind((host, 0))
            self.sock.listen()
            self.port = self.sock.getsockname()[1]
            self.peers: list[str] = []
            threading.Thread(target=self._accept, daemon=True).start()
            self.proc = None
        else:
            self.port = 18000 + secrets.randbelow(1000)
            code = (
                "import socket,sys; s=socket.socket(); s.bind((sys.argv[1], int(sys.argv[2])));"
                "s.listen(); print('ready', flush=True)\n"
                "while True:\n c, a = s.accept(); print(a[0], flush=True); c.close()"
            )
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-c", code, host, str(self.port)],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert self.proc.stdout is not None
            assert self.proc.stdout.readline().strip() == "ready"

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, addr = self.sock.accept()
                self.peers.append(addr[0])
                conn.close()

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        else:
            self.sock.close()


def host_address() -> str:
    """One of the host's own non-loopback addresses."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    v4 = [a for a in out if ":" not in a and not a.startswith("127.")]
    if not v4:
        pytest.fail("the host has no non-loopback IPv4 address to test against")
    return v4[0]


@pytest.fixture
def outside() -> Iterator[tuple[str, str, str]]:
    """A network namespace standing in for the outside world: (netns, host side, far side)."""
    name = f"wt{secrets.token_hex(3)}"
    third = 16 + secrets.randbelow(200)
    near, far = f"198.18.{third}.1", f"198.18.{third}.2"
    cmds = [
        ["ip", "netns", "add", name],
        ["ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b"],
        ["ip", "link", "set", f"{name}b", "netns", name],
        ["ip", "addr", "add", f"{near}/30", "dev", f"{name}a"],
        ["ip", "link", "set", f"{name}a", "up"],
        ["ip", "netns", "exec", name, "ip", "addr", "add", f"{far}/30", "dev", f"{name}b"],
        ["ip", "netns", "exec", name, "ip", "link", "set", f"{name}b", "up"],
        ["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for cmd in cmds:
            subprocess.run(cmd, check=True, capture_output=True)
        yield name, near, far
    finally:
        subprocess.run(["ip", "link", "del", f"{name}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


async def probe(
    manager: CapsuleManager, capsule_id: str, targets: list[tuple[str, int]]
) -> dict[tuple[str, int], str]:
    result = await manager.exec(capsule_id, PROBE.format(targets=targets), timeout=120)
    assert result.exit_code == 0, result.stderr
    seen = {}
    for line in result.stdout.splitlines():
        host, port, verdict = line.split()[:3]
        seen[(host, int(port))] = verdict
    assert len(seen) == len(targets), result.stdout
    return seen


async def test_default_capsule_reaches_nothing_on_the_host(
    manager: CapsuleManager, outside: tuple[str, str, str]
) -> None:
    netns, near, far = outside
    loopback = Listener("127.0.0.1")
    public = Listener(host_address())
    veth_side = Listener(near)
    far_server = Listener(far, netns=netns)
    try:
        a = await manager.create()
        b = await manager.create()
        assert a.network == "none"
        targets = [
            ("10.0.2.2", loopback.port),
            ("10.0.2.2", public.port),
            (public.host, public.port),
            (near, veth_side.port),
            (far, far_server.port),
            ("10.0.2.2", b.host_port),
            (public.host, b.host_port),
            ("127.0.0.1", b.host_port),
            ("10.0.2.3", 53),
        ]
        verdicts = await probe(manager, a.id, targets)
        assert set(verdicts.values()) == {"blocked"}, verdicts
        assert loopback.peers == public.peers == veth_side.peers == []
        # the host still reaches envd, and the metadata channel still answers
        meta = await manager.exec(a.id, f"cat {wire.METADATA_GUEST_PATH}")
        assert json.loads(meta.stdout)["instanceID"] == a.id
    finally:
        for listener in (loopback, public, veth_side, far_server):
            listener.close()


async def test_internet_mode_leaves_only_through_nat(
    manager: CapsuleManager, outside: tuple[str, str, str]
) -> None:
    reason = internet_unavailable_reason()
    if reason is not None:
        with pytest.raises(CapsuleError, match="unavailable"):
            await manager.create(network="internet")
        pytest.fail(f"the internet mode is unavailable on this machine: {reason}")
    netns, near, far = outside
    loopback = Listener("127.0.0.1")
    public = Listener(host_address())
    veth_side = Listener(near)
    far_server = Listener(far, netns=netns)
    try:
        other = await manager.create()
        capsule = await manager.create(network="internet")
        neighbour = await manager.create(network="internet")
        assert net.rules_active(manager.networks.scope)
        assert capsule.envd_host != "127.0.0.1"
        gateway = net.netns_for(manager.networks.scope, capsule.id, capsule.net_slot or 0).host_ip
        verdicts = await probe(
            manager,
            capsule.id,
            [
                (far, far_server.port),
                ("10.0.2.2", loopback.port),
                (public.host, public.port),
                (near, veth_side.port),
                ("10.0.2.2", other.host_port),
                (public.host, other.host_port),
                (gateway, other.host_port),
                (neighbour.envd_host, neighbour.host_port),
            ],
        )
        assert verdicts.pop((far, far_server.port)) == "open"
        assert set(verdicts.values()) == {"blocked"}, verdicts
        assert loopback.peers == public.peers == veth_side.peers == []
        # the outside server saw the host's address: the guest's traffic was NATed
        assert far_server.proc is not None and far_server.proc.stdout is not None
        assert far_server.proc.stdout.readline().strip() == near
        # host -> envd and the metadata channel work in this mode too, also after a resume
        await manager.pause(capsule.id)
        await manager.resume(capsule.id)
        meta = await manager.exec(capsule.id, f"cat {wire.METADATA_GUEST_PATH}")
        assert json.loads(meta.stdout)["network"] == "internet"
    finally:
        for listener in (loopback, public, veth_side, far_server):
            listener.close()


async def test_unknown_network_mode_is_refused(manager: CapsuleManager) -> None:
    with pytest.raises(CapsuleError, match="unknown network mode"):
        await manager.create(network="bridge")


async def test_leftovers_of_a_crashed_agent_are_removed_at_start(
    manager: CapsuleManager,
) -> None:
    if internet_unavailable_reason() is not None:
        pytest.fail(f"the internet mode is unavailable: {internet_unavailable_reason()}")
    # what a crashed agent leaves: a namespace and veth of a capsule no longer known, and rules
    scope = manager.networks.scope
    leftover = net.netns_for(scope, "cl-leftover0000", net.free_slot(set()))
    net.setup_netns(scope, leftover)
    # another agent's (another state dir's) namespace must survive this agent's clean-up
    other_scope = "ffff" if scope != "ffff" else "eeee"
    foreign = net.netns_for(other_scope, "cl-foreign00000", net.free_slot(set()))
    net.setup_netns(other_scope, foreign)
    assert net.rules_active(scope) and leftover.name in net.existing_netns(scope)
    fresh = CapsuleManager(manager.paths)
    try:
        await fresh.start(watchdog=False)
        assert not net.rules_active(scope)
        assert leftover.name not in net.existing_netns(scope)
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert leftover.host_if not in links
        assert foreign.name in net.existing_netns(other_scope)
        assert net.rules_active(other_scope)
    finally:
        await fresh.close()
        net.teardown_netns(foreign)
        net.remove_rules(other_scope)
