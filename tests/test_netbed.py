"""The WAN test bed (tests/netbed.py) does what benchmarks rely on: a notebook behind NAT dials out but
cannot be dialled, the delay relay adds its delay and keeps the bytes, and a cap caps."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys

import pytest

import netbed
from netbed import NetBed

PORT = 9000

# Run on a host as `python3 -c TOOL MODE ...`. `serve HOST:PORT` prints "ready" and answers one command
# line per connection: "whoami" (the peer's address), "echo" (everything back), "sink N" (reads N bytes,
# then "ok"), "source N" (N bytes). The other modes are clients of it and print one JSON value.
TOOL = r"""
import hashlib, json, socket, statistics, sys, threading, time
mode, host, port = sys.argv[1], *sys.argv[2].rsplit(":", 1)
address = (host, int(port))
def pattern(n):
    out, block = bytearray(), 0
    while len(out) < n:
        out += hashlib.sha256(block.to_bytes(8, "big")).digest() * 64
        block += 1
    return bytes(out[:n])
def recv_all(s, n=None):
    got = bytearray()
    while n is None or len(got) < n:
        data = s.recv(1 << 16)
        if not data:
            break
        got += data
    return bytes(got)
def handle(c, peer):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = c.makefile("rb")
    cmd = f.readline().split()
    if cmd[0] == b"whoami":
        c.sendall(peer[0].encode())
    elif cmd[0] == b"echo":
        while data := f.read1(1 << 16):
            c.sendall(data)
    elif cmd[0] == b"sink":
        n = int(cmd[1])
        while n > 0 and (data := f.read1(min(n, 1 << 16))):
            n -= len(data)
        c.sendall(b"ok")
    elif cmd[0] == b"source":
        c.sendall(pattern(int(cmd[1])))
    c.close()
def client(line):
    s = socket.create_connection(address, timeout=30)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(line.encode() + b"\n")
    return s
if mode == "serve":
    server = socket.create_server(address)
    print("ready", flush=True)
    while True:
        c, peer = server.accept()
        threading.Thread(target=handle, args=(c, peer), daemon=True).start()
elif mode == "connect":
    try:
        socket.create_connection(address, timeout=float(sys.argv[3])).close()
        print(json.dumps("connected"))
    except OSError as e:
        print(json.dumps(type(e).__name__))
elif mode == "whoami":
    print(json.dumps(recv_all(client("whoami")).decode()))
elif mode == "rtt":
    s, times = client("echo"), []
    for i in range(int(sys.argv[3])):
        t = time.perf_counter()
        s.sendall(b"x")
        s.recv(1)
        times.append(time.perf_counter() - t)
    print(json.dumps(statistics.median(times[2:]) * 1000))
elif mode == "echo":
    s, sent = client("echo"), pattern(int(sys.argv[3]))
    t = time.perf_counter()
    def send():
        s.sendall(sent)
        s.shutdown(socket.SHUT_WR)
    threading.Thread(target=send).start()
    got = recv_all(s)
    print(json.dumps({"intact": got == sent, "sent": len(sent), "got": len(got), "s": time.perf_counter() - t}))
elif mode == "up":
    n = int(sys.argv[3])
    t = time.perf_counter()
    s = client(f"sink {n}")
    s.sendall(pattern(n))
    assert recv_all(s) == b"ok"
    print(json.dumps(n * 8 / (time.perf_counter() - t) / 1e6))
elif mode == "down":
    n = int(sys.argv[3])
    t = time.perf_counter()
    assert len(recv_all(client(f"source {n}"))) == n
    print(json.dumps(n * 8 / (time.perf_counter() - t) / 1e6))
"""


def tool(host, mode: str, address: str, *args) -> object:
    """Run a client mode of TOOL on `host` and return what it printed."""
    done = host.run([sys.executable, "-c", TOOL, mode, address, *map(str, args)], capture_output=True, text=True,
                    timeout=30)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def serve(bed: NetBed, host) -> str:
    """Start TOOL's server on `host` at PORT; its address."""
    proc = bed.spawn(host, [sys.executable, "-c", TOOL, "serve", f"{host.address}:{PORT}"], stdout=subprocess.PIPE,
                     text=True)
    assert select.select([proc.stdout], [], [], 15)[0] and proc.stdout.readline() == "ready\n"
    return f"{host.address}:{PORT}"


@pytest.fixture(scope="module")
def bed():
    try:
        netbed.require()
    except RuntimeError as e:
        pytest.fail(str(e))
    with NetBed(home=2, notebooks=1) as bed:
        bed.servers = {host.name: serve(bed, host) for host in (bed.home[0], bed.notebooks[0])}
        yield bed


def test_a_notebook_dials_home_hosts_and_they_see_its_router(bed):
    """Outbound works, masqueraded: the home host sees the router's outside address, not 192.168.x."""
    assert tool(bed.notebooks[0], "whoami", bed.servers["h0"]) == bed.routers[0].address
    assert tool(bed.home[1], "whoami", bed.servers["h0"]) == bed.home[1].address


def test_no_home_host_can_open_a_connection_to_the_notebook(bed):
    notebook, router = bed.notebooks[0], bed.routers[0]
    # The notebook's server is up and reachable from inside its router: only the firewall is in the way.
    assert tool(router, "connect", bed.servers["n0"], 5) == "connected"
    for address in (notebook.address, router.address):
        assert tool(bed.home[1], "connect", f"{address}:{PORT}", 1.5) in ("TimeoutError", "ConnectionRefusedError")


def test_the_delay_relay_adds_its_delay_in_each_direction(bed):
    """A 20 ms relay between the notebook and h0 makes each round trip about 40 ms longer."""
    h0 = bed.home[0]
    relay = bed.delay(h0, (h0.address, PORT), delay_ms=20)
    try:
        direct = tool(bed.notebooks[0], "rtt", bed.servers["h0"], 12)
        relayed = tool(bed.notebooks[0], "rtt", relay.address, 12)
    finally:
        relay.close()
    assert direct < 10, direct
    assert 30 < relayed - direct < 120, (direct, relayed)


def test_the_delay_relay_keeps_bytes_in_order_and_does_not_throttle(bed):
    """8 MB there and back through a 20 ms relay arrive intact, far faster than one 64 KiB chunk per
    delay would allow (128 chunks x 20 ms = 2.6 s each way)."""
    h0 = bed.home[0]
    relay = bed.delay(h0, (h0.address, PORT), delay_ms=20)
    try:
        result = tool(bed.notebooks[0], "echo", relay.address, 8 << 20)
    finally:
        relay.close()
    assert result["intact"] and result["got"] == result["sent"] == 8 << 20, result
    assert result["s"] < 1.0, result


def test_a_cap_limits_throughput_each_way(bed):
    """h1 capped at 16 Mbit/s toward it and 40 Mbit/s from it; uncapped, it is many times faster."""
    h1, server = bed.home[1], bed.servers["h0"]
    assert tool(h1, "down", server, 4 << 20) > 200
    bed.cap(h1, 16, up_mbit=40)
    try:
        down = tool(h1, "down", server, 2 << 20)
        up = tool(h1, "up", server, 4 << 20)
    finally:
        bed.cap(h1, None)
    assert 0.3 * 16 < down < 1.5 * 16, down
    assert 0.3 * 40 < up < 1.5 * 40, up
    assert tool(h1, "up", server, 4 << 20) > 200  # lifted


def test_close_deletes_the_namespaces_even_when_building_fails(bed, monkeypatch):
    def ours():
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        return {line.split()[0] for line in listed.splitlines() if line.startswith(f"nb{os.getpid()}-")}

    before = ours()
    with NetBed(home=1, notebooks=1) as other:
        sleeper = other.spawn(other.notebooks[0], ["sleep", "60"])
        assert len(ours() - before) == 4  # the bridge, a home host, a router, a notebook
    assert ours() == before and sleeper.poll() is not None
    monkeypatch.setattr(netbed, "NAT_RULES", "table ip broken { chain c { nonsense } }")
    with pytest.raises(RuntimeError, match="nft"):
        NetBed(home=1, notebooks=1)
    assert ours() == before
