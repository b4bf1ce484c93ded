"""Throw-away test hosts: network namespaces joined by a bridge (needs root and iproute2).

Addresses are in 10.213.<n>.0/24, inside namespaces the test creates and deletes
itself; nothing is routed to or from the machine's real interfaces.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
from typing import Iterator


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def require_netns() -> None:
    if shutil.which("ip") is None:
        raise AssertionError("iproute2 is missing: apt-get install iproute2 (.ci/run does)")
    if os.geteuid() != 0:
        raise AssertionError("network-namespace tests need root (CI runs as root)")


@contextlib.contextmanager
def bridged_hosts(n: int, subnet: int = 213) -> Iterator[list[tuple[str, str]]]:
    """Yields [(namespace, address)] for ``n`` hosts on one bridge; removes everything afterwards."""
    require_netns()
    tag = secrets.token_hex(2)
    bridge = f"mlbr{tag}"
    third = int(tag, 16) % 200 + 20
    hosts = [(f"mlns{tag}{i}", f"10.{subnet}.{third}.{i + 1}") for i in range(n)]
    created: list[str] = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("link", "set", bridge, "up")
        for i, (ns, addr) in enumerate(hosts):
            _ip("netns", "add", ns)
            created.append(ns)
            veth, peer = f"mlv{tag}{i}", f"mlp{tag}{i}"
            _ip("link", "add", veth, "type", "veth", "peer", "name", peer)
            _ip("link", "set", peer, "master", bridge)
            _ip("link", "set", peer, "up")
            _ip("link", "set", veth, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "route", "add", "224.0.0.0/4", "dev", veth)
        yield hosts
    finally:
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
