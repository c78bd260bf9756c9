"""The capsule layer's side of network modes (backend/runtime/network.py does the work):
which address slot a capsule in `internet` mode gets, its namespace, and removing what a
crashed agent left behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from backend.capsules.errors import CapsuleError
from backend.capsules.models import Capsule
from backend.runtime import network as net
from backend.runtime.network import MODES, NetworkUnavailable

__all__ = ["MODES", "CapsuleNetworks", "NetworkUnavailable"]


class CapsuleNetworks:
    def __init__(self, state_dir: Path) -> None:
        self.scope = net.scope_of(state_dir)
        """Tag of this agent's network namespaces, links and nftables table."""

    def check_mode(self, network: str) -> None:
        if network not in MODES:
            raise CapsuleError(f"unknown network mode {network!r}: use one of {', '.join(MODES)}")
        if network == "internet":
            reason = net.internet_unavailable_reason()
            if reason is not None:
                raise CapsuleError(f"network mode 'internet' is unavailable: {reason}")

    def allocate(self, capsule: Capsule, capsules: list[Capsule]) -> Capsule:
        """Give an `internet` capsule its address slot and envd forward address."""
        if capsule.network != "internet":
            return capsule
        used = {c.net_slot for c in capsules if c.net_slot is not None}
        slot = net.free_slot(used)
        ns = net.netns_for(self.scope, capsule.id, slot)
        return capsule.with_(net_slot=slot, envd_host=ns.ns_ip)

    def netns(self, capsule: Capsule) -> net.CapsuleNetns:
        assert capsule.net_slot is not None, f"{capsule.id} has no network slot"
        return net.netns_for(self.scope, capsule.id, capsule.net_slot)

    def netns_name(self, capsule: Capsule) -> str | None:
        return self.netns(capsule).name if capsule.network == "internet" else None

    async def ensure(self, capsule: Capsule) -> None:
        """The capsule's namespace exists (made if missing); NetworkUnavailable if it cannot."""
        if capsule.network == "internet":
            ns = self.netns(capsule)
            if not Path(f"/run/netns/{ns.name}").exists():
                await asyncio.to_thread(net.setup_netns, self.scope, ns)

    async def teardown(self, capsule: Capsule) -> None:
        if capsule.network == "internet" and capsule.net_slot is not None:
            await asyncio.to_thread(net.teardown_last, self.scope, self.netns(capsule))

    async def reconcile(
        self, capsules: list[Capsule], report: Callable[[Capsule, str], None]
    ) -> None:
        """Remove namespaces of capsules that are gone, and the nftables table when no capsule
        uses the mode (reload it otherwise)."""
        internet = [c for c in capsules if c.network == "internet"]
        wanted = {self.netns(c).name for c in internet if c.net_slot is not None}
        try:
            for name in await asyncio.to_thread(net.existing_netns, self.scope):
                if name not in wanted:
                    await asyncio.to_thread(net.teardown_netns_named, self.scope, name)
            if internet:
                await asyncio.to_thread(net.ensure_rules, self.scope)
            else:
                await asyncio.to_thread(net.remove_rules, self.scope)
        except NetworkUnavailable as exc:
            for capsule in internet:
                report(capsule, f"network isolation unavailable: {exc}")
