"""mDNS discovery: interface choice, and a real advertiser found across processes.

Every zeroconf instance here is restricted to 127.0.0.1 so the tests never multicast onto the
machine's outer network, and every swarm name is unique so parallel runs cannot see each other.
"""

from __future__ import annotations

import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import namedtuple
from pathlib import Path

import pytest
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from swarm import discovery
from swarm.discovery import SERVICE_TYPE, Advertiser, DiscoveryError, Found, find_coordinator, interfaces_for
from swarm.errors import BadInputError, SwarmError

LO = ["127.0.0.1"]
REPO = Path(__file__).resolve().parents[1]
Nic = namedtuple("Nic", "family address netmask broadcast ptp")

CHILD = """
import sys, time
from swarm import discovery
adv = discovery.Advertiser(sys.argv[1], "child node", int(sys.argv[2]), ["127.0.0.1"], ["127.0.0.1"])
print("ready", flush=True)
while True:
    time.sleep(60)
"""


def _swarm() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def _port() -> int:
    # Nothing listens on it: discovery only publishes the number.
    return 20000 + uuid.uuid4().int % 40000


@pytest.fixture(autouse=True)
def _no_thread_leak():
    """Every zeroconf loop and browser thread started by a test is gone when it ends."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 3.0
    for t in set(threading.enumerate()) - before:
        t.join(max(deadline - time.monotonic(), 0.01))
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not left, f"threads left running: {left}"


@pytest.fixture(scope="module")
def child():
    """A coordinator advertised by another process: (swarm, port)."""
    swarm, port = _swarm(), _port()
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, swarm, str(port)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30.0)
        line = proc.stdout.readline() if ready else ""
        if line.strip() != "ready":
            proc.kill()
            pytest.fail(f"advertiser process did not start: {line!r} {proc.communicate(timeout=5)[1]}")
        yield swarm, port
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


# ---- interface choice ---------------------------------------------------------------------------

def test_interfaces_from_host():
    assert interfaces_for("0.0.0.0") is None
    assert interfaces_for("") is None
    assert interfaces_for("::") is None
    assert interfaces_for("127.0.0.1") == LO
    assert interfaces_for("127.0.1.1") == LO  # every 127.x is the same lo interface
    assert interfaces_for("localhost") == LO
    assert interfaces_for("192.168.1.7") == ["192.168.1.7"]


def test_interfaces_explicit_choice_wins(monkeypatch):
    assert interfaces_for("127.0.0.1", "all") is None
    assert interfaces_for("0.0.0.0", "off") == []
    assert interfaces_for("0.0.0.0", "OFF") == []
    assert interfaces_for("0.0.0.0", "127.0.0.1") == LO
    assert interfaces_for("127.0.0.1", "10.0.0.3") == ["10.0.0.3"]
    fake = {"lo": [Nic(socket.AF_INET, "127.0.0.1", "255.0.0.0", None, None)],
            "eth9": [Nic(socket.AF_INET, "10.1.2.3", "255.255.255.0", None, None)]}
    monkeypatch.setattr(discovery.psutil, "net_if_addrs", lambda: fake)
    assert interfaces_for("0.0.0.0", "eth9") == ["10.1.2.3"]
    assert interfaces_for("0.0.0.0", "lo") == LO
    with pytest.raises(BadInputError, match="eth9"):
        interfaces_for("0.0.0.0", "wlan42")


def test_interfaces_unresolvable_host(monkeypatch):
    def fail(host):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(discovery.socket, "gethostbyname", fail)
    with pytest.raises(BadInputError, match="--mdns-interface"):
        interfaces_for("no-such-host.invalid")


def test_local_addresses(monkeypatch):
    monkeypatch.setattr(discovery.psutil, "net_if_addrs", lambda: {
        "lo": [Nic(socket.AF_INET, "127.0.0.1", "255.0.0.0", None, None)],
        "eth0": [Nic(socket.AF_INET, "10.0.0.5", "255.255.255.0", None, None),
                 Nic(socket.AF_INET6, "fe80::1", None, None, None)],
        "eth1": [Nic(socket.AF_INET, "169.254.3.4", "255.255.0.0", None, None)],
    })
    assert discovery.local_addresses() == ["10.0.0.5"]
    monkeypatch.setattr(discovery.psutil, "net_if_addrs", lambda: {
        "lo": [Nic(socket.AF_INET, "127.0.0.1", "255.0.0.0", None, None)]})
    assert discovery.local_addresses() == ["127.0.0.1"]


def test_found_address():
    assert Found(swarm="s", host="10.0.0.5", port=7000, name="n").address == "10.0.0.5:7000"


# ---- bad input and mDNS off ---------------------------------------------------------------------

def test_bad_arguments():
    for bad in (
        lambda: Advertiser("", "n", 7000, LO, LO),
        lambda: Advertiser("s", "n", 0, LO, LO),
        lambda: Advertiser("s", "n", 70000, LO, LO),
        lambda: Advertiser("s", "n", 7000, [], LO),
        lambda: Advertiser("s", "n", 7000, ["not-an-ip"], LO),
        lambda: Advertiser("s", "n", 7000, LO, "127.0.0.1"),
        lambda: Advertiser("x" * 300, "n", 7000, LO, LO),
        lambda: find_coordinator("s", LO, timeout=0),
        lambda: find_coordinator("", LO),
    ):
        with pytest.raises(BadInputError):
            bad()


def test_mdns_off():
    with Advertiser(_swarm(), "n", 7000, LO, []) as adv:  # does nothing, opens nothing
        pass
    adv.close()
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError, match="mDNS is off") as e:
        find_coordinator(_swarm(), [], timeout=5.0)
    assert time.monotonic() - t0 < 0.5
    assert "--coordinator" in str(e.value)
    assert isinstance(e.value, SwarmError)


# ---- real mDNS over loopback --------------------------------------------------------------------

def test_finds_advertiser_in_another_process(child):
    swarm, port = child
    t0 = time.monotonic()
    found = find_coordinator(swarm, LO, timeout=10.0)
    assert time.monotonic() - t0 < 5.0
    assert (found.swarm, found.host, found.port) == (swarm, "127.0.0.1", port)
    assert found.address == f"127.0.0.1:{port}"
    assert found.name.startswith("child-node-")


def test_other_swarm_is_not_returned(child):
    other, _ = child
    t0 = time.monotonic()
    with pytest.raises(DiscoveryError) as e:
        find_coordinator(_swarm(), LO, timeout=2.0)
    assert time.monotonic() - t0 < 4.0
    message = str(e.value)
    assert "--coordinator" in message
    assert repr(other) in message  # it saw the other swarm and named it


def test_only_coordinators_are_returned():
    swarm = _swarm()
    zc = Zeroconf(interfaces=LO, ip_version=IPVersion.V4Only)
    try:
        info = ServiceInfo(
            SERVICE_TYPE, f"plain-node-{uuid.uuid4().hex[:8]}.{SERVICE_TYPE}", addresses=[socket.inet_aton("127.0.0.1")],
            port=_port(), properties={"swarm": swarm, "role": "node"}, server=f"plain-{uuid.uuid4().hex[:8]}.local.",
        )
        zc.register_service(info)
        with pytest.raises(DiscoveryError, match="--coordinator"):
            find_coordinator(swarm, LO, timeout=2.0)
        zc.unregister_service(info)
    finally:
        zc.close()


def test_closed_advertiser_is_not_found():
    swarm, port = _swarm(), _port()
    with Advertiser(swarm, "soon gone", port, LO, LO) as adv:
        assert find_coordinator(swarm, LO, timeout=10.0).port == port
    adv.close()  # idempotent
    # A fresh browser has an empty cache and nobody answers any more.
    with pytest.raises(DiscoveryError, match="--coordinator"):
        find_coordinator(swarm, LO, timeout=2.0)
