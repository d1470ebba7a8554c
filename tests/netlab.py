"""Test hosts in network namespaces: each gets its own address on a private bridge, reachable only from
the other test hosts; links can be cut like a pulled cable. Needs root and iproute2 (`ip netns`)."""

from __future__ import annotations

import os
import subprocess


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class NetLab:
    """Hosts h0..h{n-1} at 10.231.0.1.. on a bridge in a namespace of its own; nothing else is reachable."""

    SUBNET = "10.231.0"

    def __init__(self, n: int):
        tag = f"sw{os.getpid() % 100000}"
        self.bridge_ns = f"{tag}-br"
        self.hosts = [f"{tag}-h{i}" for i in range(n)]
        self._made: list[str] = []
        try:
            _ip("netns", "add", self.bridge_ns)
            self._made.append(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                _ip("netns", "add", host)
                self._made.append(host)
                _ip("-n", self.bridge_ns, "link", "add", f"v{i}", "type", "veth", "peer", "name", "eth0", "netns", host)
                _ip("-n", self.bridge_ns, "link", "set", f"v{i}", "master", "br0")
                _ip("-n", self.bridge_ns, "link", "set", f"v{i}", "up")
                _ip("-n", host, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
                _ip("-n", host, "link", "set", "eth0", "up")
                _ip("-n", host, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def address(self, i: int) -> str:
        return f"{self.SUBNET}.{i + 1}"

    def prefix(self, i: int) -> list[str]:
        """Run a command on host i: prepend this."""
        return ["ip", "netns", "exec", self.hosts[i]]

    def cut(self, i: int) -> None:
        """Pull host i's cable: the bridge drops its port, packets to and from it are lost."""
        _ip("-n", self.bridge_ns, "link", "set", f"v{i}", "down")

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()
