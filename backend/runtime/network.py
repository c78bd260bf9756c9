"""Capsule network isolation.

QEMU's user-mode network (slirp) is the capsule's only link, and its gateway 10.0.2.2 is the
loopback of whatever network namespace QEMU runs in. In the host's namespace that would reach
every local service (the agent's API, other capsules' envd forwards), so:

none      (default) `restrict=on`: slirp routes no guest packet anywhere. The host's 127.0.0.1
          port forward to envd still works (metadata is a fw_cfg file, not an address).
          Needs nothing.
internet  QEMU runs in its own network namespace `wn-<scope>-<id>`, linked to the host by a
          veth pair (`wh<scope><id>` 10.201.a.b/30 on the host, `wc<scope><id>` = +1 inside),
          with `restrict=off`. The guest's gateway is then the namespace's own empty loopback;
          envd's forward listens on the namespace's veth address, reachable only from the host.
          nftables table `inet wrenn_<scope>` drops new connections from any capsule veth to
          the host itself (input) and to other capsules (forward), and masquerades the rest out
          of the host's default route. Private and special destinations are dropped too
          (BLOCKED: cloud metadata and all link-local, RFC 1918, CGNAT, multicast, reserved;
          IPv6 ULA, link-local, multicast) except the ranges in `WRENN_INTERNET_ALLOW` and DNS
          (port 53) to the host's own resolvers. Needs root, iproute2, nftables, and it turns
          on IPv4 forwarding; when it was off, it is turned off again once no agent's table is
          left (a marker table remembers).
Host state (namespaces, veths, the table) is removed by the agent when no live capsule needs it,
at start after a crash included. Every name carries a tag of the agent's state dir (its scope),
so agents with different state dirs on one host (tests do this) never remove each other's.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from backend.config import settings

MODES = ("none", "internet")
SUBNET = ipaddress.ip_network("10.201.0.0/16")
SLOTS = SUBNET.num_addresses // 4
BLOCKED_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
"""Never reached from an internet capsule unless allowed: cloud metadata (169.254.169.254) and
the rest of link-local, RFC 1918, CGNAT, multicast, reserved and broadcast."""
BLOCKED_V6 = ("fc00::/7", "fe80::/10", "ff00::/8", "::ffff:0:0/96")
FORWARD_FILE = Path("/proc/sys/net/ipv4/ip_forward")
FORWARD_MARKER = "wrenn_forwarding_was_off"
"""An empty table in the namespace's nftables: forwarding was off before an agent turned it on
(kept in the kernel, so it survives an agent crash and is per network namespace)."""
RESOLV_CONF = Path("/etc/resolv.conf")


def scope_of(state_dir: Path) -> str:
    """A 4-hex-digit tag naming one agent's (state dir's) namespaces, links and table."""
    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:4]


def table_name(scope: str) -> str:
    return f"wrenn_{scope}"


def netns_prefix(scope: str) -> str:
    return f"wn-{scope}-"


def host_if_prefix(scope: str) -> str:
    return f"wh{scope}"


class NetworkUnavailable(Exception):
    """The requested network mode cannot be provided here; the message says why."""


@dataclass(frozen=True)
class CapsuleNetns:
    name: str
    host_if: str
    host_ip: str
    ns_ip: str


def _tool(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _run(
    *argv: str, check: bool = True, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, input=stdin, check=False)
    if check and result.returncode != 0:
        raise NetworkUnavailable(f"`{' '.join(argv)}` failed: {result.stderr.strip()}")
    return result


def internet_unavailable_reason() -> str | None:
    """None when the internet mode can be set up here, else why not."""
    if os.geteuid() != 0:
        return "it needs root (network namespaces and nftables rules)"
    if _tool("ip") is None:
        return "it needs iproute2: apt-get install iproute2"
    if _tool("nft") is None:
        return "it needs nftables: apt-get install nftables"
    return None


def netns_for(scope: str, capsule_id: str, slot: int) -> CapsuleNetns:
    short = capsule_id.removeprefix("cl-")[-8:]
    base = int(SUBNET.network_address) + 4 * slot
    return CapsuleNetns(
        name=f"{netns_prefix(scope)}{short}",
        host_if=f"{host_if_prefix(scope)}{short}",
        host_ip=str(ipaddress.ip_address(base + 1)),
        ns_ip=str(ipaddress.ip_address(base + 2)),
    )


def existing_netns(scope: str) -> list[str]:
    if _tool("ip") is None:
        return []
    out = _run("ip", "netns", "list", check=False).stdout
    prefix = netns_prefix(scope)
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]


def slots_in_use_on_host() -> set[int]:
    """Slots whose host-side address is configured on this host (by any agent)."""
    if _tool("ip") is None:
        return set()
    out = _run("ip", "-o", "-4", "addr", "show", check=False).stdout
    used = set()
    for line in out.split("\n"):
        fields = line.split()
        if "inet" in fields:
            address = ipaddress.ip_interface(fields[fields.index("inet") + 1]).ip
            if address in SUBNET:
                used.add((int(address) - int(SUBNET.network_address)) // 4)
    return used


def free_slot(used: set[int]) -> int:
    taken = used | slots_in_use_on_host()
    for slot in range(SLOTS):
        if slot not in taken:
            return slot
    raise NetworkUnavailable("no free address slot for another internet-mode capsule")


def parse_allow(ranges: Sequence[str]) -> tuple[list[str], list[str]]:
    """(IPv4, IPv6) networks of an allow list; ValueError naming a bad entry."""
    v4: list[str] = []
    v6: list[str] = []
    for raw in ranges:
        try:
            network = ipaddress.ip_network(raw.strip(), strict=False)
        except ValueError:
            message = f"WRENN_INTERNET_ALLOW: {raw!r} is not an address or network"
            raise ValueError(message) from None
        (v4 if network.version == 4 else v6).append(str(network))
    return v4, v6


def host_resolvers(path: Path = RESOLV_CONF) -> list[str]:
    """The IPv4 name servers the host uses (slirp forwards the guest's DNS to them)."""
    found = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(fields[1])
                    if address.version == 4 and not address.is_loopback:
                        found.append(str(address))
    return found


def ruleset(scope: str, allow: Sequence[str] = (), resolvers: Sequence[str] = ()) -> str:
    ours = f"{host_if_prefix(scope)}*"
    allow_v4, allow_v6 = parse_allow(allow)
    openings = ""
    for family, networks in (("ip", allow_v4), ("ip6", allow_v6)):
        if networks:
            openings += f'    iifname "{ours}" {family} daddr {{ {", ".join(networks)} }} accept\n'
    for resolver in resolvers:
        openings += (
            f'    iifname "{ours}" ip daddr {resolver} meta l4proto {{ tcp, udp }} '
            "th dport 53 accept\n"
        )
    return (
        f"table inet {table_name(scope)} {{\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f'    iifname "{ours}" ct state new counter drop\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{ours}" oifname "{ours}" counter drop\n'
        f'    oifname "{ours}" ct state new counter drop\n'
        f"{openings}"
        f'    iifname "{ours}" ip daddr {{ {", ".join(BLOCKED_V4)} }} counter drop\n'
        f'    iifname "{ours}" ip6 daddr {{ {", ".join(BLOCKED_V6)} }} counter drop\n'
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    iifname "{ours}" oifname != "{ours}" masquerade\n'
        "  }\n"
        "}\n"
    )


@contextlib.contextmanager
def scope_lock(scope: str) -> Iterator[None]:
    """One agent process at a time changes a scope's rules and namespaces (a capsule being
    set up must never find its table removed by another one's teardown)."""
    fd = os.open(f"/run/wrenn-net-{scope}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def ensure_rules(scope: str, allow: Sequence[str] | None = None) -> None:
    """Load this scope's table and turn on forwarding; idempotent. `allow` (default: the
    `WRENN_INTERNET_ALLOW` setting) re-opens blocked ranges."""
    reason = internet_unavailable_reason()
    if reason is not None:
        raise NetworkUnavailable(reason)
    nft = _tool("nft")
    assert nft is not None
    if allow is None:
        allow = settings().internet_allow
    try:
        rules = ruleset(scope, allow, host_resolvers())
    except ValueError as exc:
        raise NetworkUnavailable(str(exc)) from None
    # `add` then `delete` makes the reload work whether or not the table exists
    table = table_name(scope)
    script = f"add table inet {table}\ndelete table inet {table}\n" + rules
    _run(nft, "-f", "-", stdin=script)
    if FORWARD_FILE.read_text().strip() != "1":
        _run(nft, "add", "table", "inet", FORWARD_MARKER)
        FORWARD_FILE.write_text("1\n")


def _wrenn_tables(nft: str) -> list[str]:
    out = _run(nft, "list", "tables", check=False).stdout
    return re.findall(r"^table inet (wrenn_[0-9a-f]{4})$", out, flags=re.MULTILINE)


def remove_rules(scope: str) -> None:
    """Drop this scope's table; the last agent's table gone, forwarding goes back to off if
    an agent turned it on."""
    nft = _tool("nft")
    if nft is None or os.geteuid() != 0:
        return
    _run(nft, "delete", "table", "inet", table_name(scope), check=False)
    if _wrenn_tables(nft):
        return
    if _run(nft, "list", "table", "inet", FORWARD_MARKER, check=False).returncode == 0:
        FORWARD_FILE.write_text("0\n")
        _run(nft, "delete", "table", "inet", FORWARD_MARKER, check=False)


def rules_active(scope: str) -> bool:
    nft = _tool("nft")
    if nft is None or os.geteuid() != 0:
        return False
    return _run(nft, "list", "table", "inet", table_name(scope), check=False).returncode == 0


def setup_netns(scope: str, net: CapsuleNetns) -> None:
    """Create the capsule's namespace and veth pair (replacing leftovers of the same name)."""
    with scope_lock(scope):
        _setup_netns(scope, net)


def _setup_netns(scope: str, net: CapsuleNetns) -> None:
    ensure_rules(scope)
    teardown_netns(net)
    ns_if = "wc" + net.host_if[2:]
    try:
        _run("ip", "netns", "add", net.name)
        _run("ip", "link", "add", net.host_if, "type", "veth", "peer", "name", ns_if)
        _run("ip", "link", "set", ns_if, "netns", net.name)
        _run("ip", "addr", "add", f"{net.host_ip}/30", "dev", net.host_if)
        _run("ip", "link", "set", net.host_if, "up")
        _run("ip", "-n", net.name, "addr", "add", f"{net.ns_ip}/30", "dev", ns_if)
        _run("ip", "-n", net.name, "link", "set", ns_if, "up")
        _run("ip", "-n", net.name, "link", "set", "lo", "up")
        _run("ip", "-n", net.name, "route", "add", "default", "via", net.host_ip)
    except NetworkUnavailable:
        teardown_netns(net)
        raise


def teardown_last(scope: str, net: CapsuleNetns) -> None:
    """Delete a capsule's namespace; with it the scope's rules when no namespace is left."""
    with scope_lock(scope):
        teardown_netns(net)
        if not existing_netns(scope):
            remove_rules(scope)


def teardown_netns(net: CapsuleNetns) -> None:
    """Delete a namespace and its veth pair."""
    if _tool("ip") is None:
        return
    _run("ip", "link", "del", net.host_if, check=False)
    _run("ip", "netns", "del", net.name, check=False)


def teardown_netns_named(scope: str, name: str) -> None:
    """Delete a leftover namespace found by name (its veth is named after it)."""
    short = name.removeprefix(netns_prefix(scope))
    if _tool("ip") is None:
        return
    _run("ip", "link", "del", f"{host_if_prefix(scope)}{short}", check=False)
    _run("ip", "netns", "del", name, check=False)
