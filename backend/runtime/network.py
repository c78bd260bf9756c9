"""Capsule network isolation.

QEMU's user-mode network (slirp) is the capsule's only link, and its gateway 10.0.2.2 is the
loopback of whatever network namespace QEMU runs in. In the host's namespace that would reach
every local service (the agent's API, other capsules' envd forwards), so:

none      (default) `restrict=on`: slirp routes no guest packet anywhere. The host's 127.0.0.1
          port forward to envd and the metadata address (a `guestfwd` command) still work.
          Needs nothing.
internet  QEMU runs in its own network namespace `wn-<id>`, linked to the host by a veth pair
          (host 10.201.a.b/30 <-> namespace +1), with `restrict=off`. The guest's gateway is
          then the namespace's own empty loopback; envd's forward listens on the namespace's
          veth address, reachable only from the host. nftables table `inet wrenn` drops new
          connections from any capsule veth to the host itself (input) and to other capsules
          (forward), and masquerades the rest out of the host's default route. Needs root,
          iproute2, nftables, and it turns on IPv4 forwarding.
Host state (namespaces, veths, the table) is removed by the agent when no live capsule needs it,
at start after a crash included.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

MODES = ("none", "internet")
NFT_TABLE = "wrenn"
NETNS_PREFIX = "wn-"
HOST_IF_PREFIX = "wnh-"
NS_IF_PREFIX = "wnc-"
SUBNET = ipaddress.ip_network("10.201.0.0/16")
SLOTS = SUBNET.num_addresses // 4


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


def netns_for(capsule_id: str, slot: int) -> CapsuleNetns:
    short = capsule_id.removeprefix("cl-")[-10:]
    base = int(SUBNET.network_address) + 4 * slot
    return CapsuleNetns(
        name=f"{NETNS_PREFIX}{short}",
        host_if=f"{HOST_IF_PREFIX}{short}",
        host_ip=str(ipaddress.ip_address(base + 1)),
        ns_ip=str(ipaddress.ip_address(base + 2)),
    )


def existing_netns() -> list[str]:
    if _tool("ip") is None:
        return []
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NETNS_PREFIX)]


def free_slot(used: set[int]) -> int:
    for slot in range(SLOTS):
        if slot not in used:
            return slot
    raise NetworkUnavailable("no free address slot for another internet-mode capsule")


def ruleset() -> str:
    return (
        f"table inet {NFT_TABLE} {{\n"
        "  chain input {\n"
        "    type filter hook input priority filter; policy accept;\n"
        f'    iifname "{HOST_IF_PREFIX}*" ct state new counter drop\n'
        "  }\n"
        "  chain forward {\n"
        "    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{HOST_IF_PREFIX}*" oifname "{HOST_IF_PREFIX}*" counter drop\n'
        f'    oifname "{HOST_IF_PREFIX}*" ct state new counter drop\n'
        "  }\n"
        "  chain postrouting {\n"
        "    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    ip saddr {SUBNET} oifname != "{HOST_IF_PREFIX}*" masquerade\n'
        "  }\n"
        "}\n"
    )


def ensure_rules() -> None:
    """Load the table and turn on forwarding; idempotent."""
    reason = internet_unavailable_reason()
    if reason is not None:
        raise NetworkUnavailable(reason)
    nft = _tool("nft")
    assert nft is not None
    # `add` then `delete` makes the reload work whether or not the table exists
    script = f"add table inet {NFT_TABLE}\ndelete table inet {NFT_TABLE}\n" + ruleset()
    _run(nft, "-f", "-", stdin=script)
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")


def remove_rules() -> None:
    nft = _tool("nft")
    if nft is not None and os.geteuid() == 0:
        _run(nft, "delete", "table", "inet", NFT_TABLE, check=False)


def rules_active() -> bool:
    nft = _tool("nft")
    if nft is None or os.geteuid() != 0:
        return False
    return _run(nft, "list", "table", "inet", NFT_TABLE, check=False).returncode == 0


def setup_netns(net: CapsuleNetns) -> None:
    """Create the capsule's namespace and veth pair (replacing leftovers of the same name)."""
    ensure_rules()
    teardown_netns(net.name)
    ns_if = net.host_if.replace(HOST_IF_PREFIX, NS_IF_PREFIX, 1)
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
        teardown_netns(net.name)
        raise


def teardown_netns(name: str) -> None:
    """Delete a namespace; its veth pair goes with it."""
    if _tool("ip") is None:
        return
    short = name.removeprefix(NETNS_PREFIX)
    _run("ip", "link", "del", f"{HOST_IF_PREFIX}{short}", check=False)
    _run("ip", "netns", "del", name, check=False)
