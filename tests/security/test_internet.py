"""Issue 16 item 4: an `internet` capsule reaches the outside but not cloud metadata, private,
CGNAT or link-local ranges (listeners on such addresses in a namespace the test makes), an
allow list re-opens a range, and IPv4 forwarding goes back to off when the agent turned it on
and the last internet capsule is gone."""

from __future__ import annotations

import secrets
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from backend.capsules.manager import CapsuleManager
from backend.runtime import network as net
from tests.integration.conftest import manager
from tests.integration.test_network import Listener, probe

__all__ = ["manager"]

# One address in each range that must stay closed (none is used by this host).
GUARDED = {
    "link-local / cloud metadata": "169.254.77.77",
    "RFC 1918 10/8": "10.254.77.7",
    "RFC 1918 172.16/12": "172.31.254.7",
    "RFC 1918 192.168/16": "192.168.254.7",
    "CGNAT 100.64/10": "100.127.254.7",
}


def run(*argv: str) -> None:
    subprocess.run(list(argv), check=True, capture_output=True)


@pytest.fixture
def lan() -> Iterator[tuple[str, str, str]]:
    """A namespace holding the guarded addresses plus an 'outside' one, routed from the host
    through a veth pair: (netns, host side, outside address)."""
    if net.internet_unavailable_reason() is not None:
        pytest.fail(f"the internet mode is unavailable: {net.internet_unavailable_reason()}")
    name = f"ws{secrets.token_hex(3)}"
    third = 16 + secrets.randbelow(200)
    near, far = f"198.19.{third}.1", f"198.19.{third}.2"
    routes: list[str] = []
    try:
        run("ip", "netns", "add", name)
        run("ip", "link", "add", f"{name}a", "type", "veth", "peer", "name", f"{name}b")
        run("ip", "link", "set", f"{name}b", "netns", name)
        run("ip", "addr", "add", f"{near}/30", "dev", f"{name}a")
        run("ip", "link", "set", f"{name}a", "up")
        run("ip", "-n", name, "addr", "add", f"{far}/30", "dev", f"{name}b")
        run("ip", "-n", name, "link", "set", f"{name}b", "up")
        run("ip", "-n", name, "link", "set", "lo", "up")
        for address in GUARDED.values():
            run("ip", "-n", name, "addr", "add", f"{address}/32", "dev", "lo")
            run("ip", "route", "add", f"{address}/32", "via", far, "dev", f"{name}a")
            routes.append(address)
        yield name, near, far
    finally:
        for address in routes:
            subprocess.run(["ip", "route", "del", f"{address}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{name}a"], capture_output=True)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@pytest.mark.vm
async def test_internet_capsule_reaches_no_private_or_metadata_range(
    manager: CapsuleManager, lan: tuple[str, str, str]
) -> None:
    netns, _near, far = lan
    listeners = {what: Listener(address, netns=netns) for what, address in GUARDED.items()}
    outside = Listener(far, netns=netns)
    try:
        capsule = await manager.create(network="internet")
        scope = manager.networks.scope
        targets = [(far, outside.port)] + [(lst.host, lst.port) for lst in listeners.values()]
        verdicts = await probe(manager, capsule.id, targets)
        assert verdicts.pop((far, outside.port)) == "open", "the outside is not reachable"
        assert set(verdicts.values()) == {"blocked"}, verdicts

        # An allow list re-opens exactly its range.
        net.ensure_rules(scope, allow=["10.254.77.0/24"])
        verdicts = await probe(manager, capsule.id, targets)
        assert verdicts.pop((GUARDED["RFC 1918 10/8"], listeners["RFC 1918 10/8"].port)) == "open"
        assert verdicts.pop((far, outside.port)) == "open"
        assert set(verdicts.values()) == {"blocked"}, verdicts
        net.ensure_rules(scope)

        # The last internet capsule gone, so are its rules.
        await manager.destroy(capsule.id)
        assert not net.rules_active(scope)
    finally:
        for listener in (*listeners.values(), outside):
            listener.close()


def test_bad_allow_list_is_refused_with_its_entry() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        net.ruleset("abcd", ["10.1.0.0/16", "10.0.0.0/33"])


FORWARDING = textwrap.dedent(
    """
    from pathlib import Path
    from backend.runtime import network as net
    f = Path("/proc/sys/net/ipv4/ip_forward")
    f.write_text(START)
    seen = []
    net.ensure_rules("aaa1", allow=[])
    net.ensure_rules("aaa2", allow=[])
    seen.append(f.read_text().strip())
    net.remove_rules("aaa1")
    seen.append(f.read_text().strip())
    net.remove_rules("aaa2")
    seen.append(f.read_text().strip())
    print(" ".join(seen))
    """
)


@pytest.mark.parametrize(("start", "expected"), [("0", "1 1 0"), ("1", "1 1 1")])
def test_forwarding_goes_back_off_with_the_last_table(start: str, expected: str) -> None:
    """In a namespace of its own (forwarding is per namespace): the host's is not touched."""
    if net.internet_unavailable_reason() is not None:
        pytest.fail(f"the internet mode is unavailable: {net.internet_unavailable_reason()}")
    name = f"wf{secrets.token_hex(3)}"
    run("ip", "netns", "add", name)
    try:
        code = FORWARDING.replace("START", repr(start + "\n"))
        out = subprocess.run(
            ["ip", "netns", "exec", name, sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert " ".join(out) == expected
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
