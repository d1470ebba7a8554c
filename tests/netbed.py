"""A small WAN in network namespaces, for tests and benchmarks: a home LAN, notebooks behind NAT, capped
links and delayed paths. Needs root, iproute2 (`ip`, `tc`) and nftables (`nft`); scripts/test.sh
installs nftables where it is missing.

The layout (addresses are the defaults)::

    home hosts h0, h1, ...  10.233.0.1, .2, ...  on one bridge (its own namespace)
    router r0               10.233.0.254 on the bridge (its "internet" address), 192.168.60.1 inside
    notebook n0             192.168.60.2, default route via r0

Each router masquerades what its notebook sends out and drops every new connection from outside: a
notebook can dial any home host (which sees the router's address as the peer), but no home host can
open a connection to a notebook, neither at its private address (home hosts do have a route to it, so
only the firewall stops them) nor at its router's. Nothing here is reachable from the machine itself.

A benchmark script uses it like this (from the repository root)::

    sys.path.insert(0, "tests")
    from netbed import NetBed

    with NetBed(home=2, notebooks=1) as bed:
        coord, node = bed.home[0], bed.home[1]
        bed.cap(bed.notebooks[0], 20, up_mbit=5)        # the notebook's link: 20 Mbit/s down, 5 up
        relay = bed.delay(coord, (coord.address, 7700), delay_ms=25)
        bed.spawn(coord, [sys.executable, "-m", "swarm.cli", "join", "--host", coord.address, ...])
        bed.spawn(bed.notebooks[0], [..., "--coordinator", relay.address, ...])

A delay sits on a path, not on a link: the relay listens at an address of its own (a free port on
`coord` above) and forwards each connection to the target, holding bytes `delay_ms` in each direction.
Whoever should see the long path dials `relay.address` instead of the target; above, the notebook
reaches its coordinator 50 ms of round trip away, while `node` dials the coordinator directly. Caps
(`tc` tbf on both ends of a host's link) apply to everything on that link.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

RELAY = Path(__file__).resolve().parent.parent / "scripts" / "delay_relay.py"
_beds = itertools.count()

# The notebook's router: masquerade outbound, nothing new inbound (to the router or through it).
NAT_RULES = """
table ip netbed {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan" ct state established,related accept
        iifname "wan" drop
    }
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan" masquerade
    }
}
"""


def require() -> None:
    """Raise RuntimeError saying what is missing when this machine cannot build a bed."""
    if os.geteuid() != 0:
        raise RuntimeError("the network test bed makes network namespaces: run as root (CI does)")
    missing = [tool for tool in ("ip", "tc", "nft") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"the network test bed needs {', '.join(missing)}: install iproute2 and nftables "
                           "(scripts/test.sh installs nftables)")


def _run(*args: str, input: str | None = None) -> None:
    done = subprocess.run(args, input=input, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()}")


class Host:
    """One namespace with one address: a home host, a router (its outside address) or a notebook."""

    def __init__(self, name: str, ns: str, address: str):
        self.name, self.ns, self.address = name, ns, address
        self.link: list[tuple[str, str]] = []  # (namespace, device): the far end first, then its own end

    @property
    def prefix(self) -> list[str]:
        """Prepend to a command to run it on this host."""
        return ["ip", "netns", "exec", self.ns]

    def run(self, args: list[str], **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run on this host (a short command that ends by itself)."""
        return subprocess.run([*self.prefix, *args], **kwargs)

    def __repr__(self) -> str:
        return f"Host({self.name} {self.address} in {self.ns})"


class Relay:
    """A running delay relay (scripts/delay_relay.py): dial `address` ("host:port") to take the slow path."""

    def __init__(self, proc: subprocess.Popen, address: str):
        self.proc, self.address = proc, address
        host, _, port = address.rpartition(":")
        self.host, self.port = host, int(port)

    def close(self) -> None:
        _stop(self.proc)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


class NetBed:
    """Home hosts on a bridge and notebooks each behind a NAT router, all in namespaces of their own.

    `home` lists the home hosts (h0..), `notebooks` the notebooks (n0..), `routers` their routers (r0..;
    `address` is the outside one). Namespace names carry this process's id, so beds of concurrent test
    runs never meet; `close` (or leaving a `with` block) stops what was spawned and deletes them all.
    """

    HOME = "10.233.0"  # home hosts at .1.., router k at .254-k
    PRIVATE = "192.168"  # notebook k's subnet: 192.168.(60+k).0/24, the router at .1, the notebook at .2

    def __init__(self, home: int = 2, notebooks: int = 1):
        require()
        tag = f"nb{os.getpid()}-{next(_beds)}"
        self.bridge_ns = f"{tag}-br"
        self.home: list[Host] = []
        self.routers: list[Host] = []
        self.notebooks: list[Host] = []
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []
        try:
            self._netns(self.bridge_ns)
            _run("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _run("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
            for i in range(home):
                host = Host(f"h{i}", self._netns(f"{tag}-h{i}"), f"{self.HOME}.{i + 1}")
                self._wire(host, self.bridge_ns, f"v{i}", "eth0", bridge=True)
                self.home.append(host)
            for k in range(notebooks):
                subnet = f"{self.PRIVATE}.{60 + k}"
                router = Host(f"r{k}", self._netns(f"{tag}-r{k}"), f"{self.HOME}.{254 - k}")
                self._wire(router, self.bridge_ns, f"r{k}", "wan", bridge=True)
                notebook = Host(f"n{k}", self._netns(f"{tag}-n{k}"), f"{subnet}.2")
                self._wire(notebook, router.ns, "lan", "eth0")
                _run("ip", "-n", router.ns, "addr", "add", f"{subnet}.1/24", "dev", "lan")
                _run("ip", "-n", notebook.ns, "route", "add", "default", "via", f"{subnet}.1")
                _run("ip", "netns", "exec", router.ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
                _run("ip", "netns", "exec", router.ns, "nft", "-f", "-", input=NAT_RULES)
                for h in self.home:  # a route in: only the router's firewall keeps them out
                    _run("ip", "-n", h.ns, "route", "add", f"{subnet}.0/24", "via", router.address)
                self.routers.append(router)
                self.notebooks.append(notebook)
        except BaseException:
            self.close()
            raise

    def _netns(self, ns: str) -> str:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)  # a dead run's leftover
        _run("ip", "netns", "add", ns)
        self._made.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def _wire(self, host: Host, far_ns: str, far_dev: str, dev: str, bridge: bool = False) -> None:
        """A veth pair from `far_ns` (plugged into its bridge if `bridge`) to `host`, which gets its address."""
        _run("ip", "-n", far_ns, "link", "add", far_dev, "type", "veth", "peer", "name", dev, "netns", host.ns)
        if bridge:
            _run("ip", "-n", far_ns, "link", "set", far_dev, "master", "br0")
        _run("ip", "-n", far_ns, "link", "set", far_dev, "up")
        _run("ip", "-n", host.ns, "addr", "add", f"{host.address}/24", "dev", dev)
        _run("ip", "-n", host.ns, "link", "set", dev, "up")
        host.link = [(far_ns, far_dev), (host.ns, dev)]

    def cap(self, host: Host, mbit: float | None, up_mbit: float | None = None) -> None:
        """Cap `host`'s link at `mbit` Mbit/s toward the host and `up_mbit` (default: the same) from it,
        with tc tbf; None lifts the cap. A notebook's link is the one to its router; a router's, its
        "internet" side (shared by what its notebook sends and receives)."""
        up_mbit = mbit if up_mbit is None else up_mbit
        for (ns, dev), rate in zip(host.link, (mbit, up_mbit)):
            if rate is None:
                subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30)
                continue
            # A bucket of 10 ms at the rate (at least 16 full frames); a queue of 50 ms before drops.
            burst = max(int(rate * 1e6 / 8 * 0.01), 16 * 1514)
            _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate}mbit",
                 "burst", str(burst), "latency", "50ms")

    def cut(self, host: Host, up: bool = False) -> None:
        """Pull `host`'s cable (both ends of its link down), or plug it back in with `up`."""
        for ns, dev in host.link:
            _run("ip", "-n", ns, "link", "set", dev, "up" if up else "down")

    def spawn(self, host: Host, args: list[str], **kwargs) -> subprocess.Popen:
        """Start a process on `host` (subprocess.Popen arguments); `close` stops it if it still runs."""
        proc = subprocess.Popen([*host.prefix, *args], **kwargs)
        self._procs.append(proc)
        return proc

    def delay(self, host: Host, target: tuple[str, int], delay_ms: float, port: int = 0) -> Relay:
        """Start a delay relay on `host`, listening at its address (`port`, 0 for any free one) and
        forwarding to `target` with `delay_ms` added in each direction; the relay's address is returned."""
        proc = self.spawn(host, [sys.executable, str(RELAY), "--listen", f"{host.address}:{port}",
                                 "--to", f"{target[0]}:{target[1]}", "--delay-ms", str(delay_ms)],
                          stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([proc.stdout], [], [], 15)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith("listening "):
            _stop(proc)
            raise RuntimeError(f"the delay relay on {host} did not start (exit {proc.poll()}): {line!r}")
        return Relay(proc, line.split()[1])

    def close(self) -> None:
        """Stop every spawned process, then delete every namespace; safe to call twice."""
        for proc in reversed(self._procs):
            _stop(proc)
        self._procs.clear()
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self._made.clear()

    def __enter__(self) -> NetBed:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
