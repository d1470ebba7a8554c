"""The relay on 127.0.0.1: bytes cross it intact both ways, many connections at once, the pool refills,
a node's control connection comes back, a peer of a node that is gone is closed at once, a node
without the swarm key is refused, and a flood of silent connections meets a limit while nodes still get
in."""

from __future__ import annotations

import os
import socket
import threading
import time

import grpc
import pytest

from swarm.wire import relay as rl
from swarm.wire.relay_client import RelayClient

KEY = "relay-test-key-of-the-tests"


class Echo:
    """A local server standing for a node's gRPC or step server: answers each byte stream with
    `tag` + the bytes received, and closes its side once the peer half-closed."""

    def __init__(self, tag: bytes):
        self.tag = tag
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        with c:
            c.sendall(self.tag)
            while data := c.recv(1 << 16):
                c.sendall(data)
            c.shutdown(socket.SHUT_WR)

    def close(self):
        self.sock.close()


@pytest.fixture
def lab():
    relay = rl.Relay("127.0.0.1", 0, KEY)
    grpc_srv, step_srv = Echo(b"G"), Echo(b"S")
    made = []

    def node(key=KEY, pool=4, name="nb"):
        e = relay.open(name)
        client = RelayClient(("127.0.0.1", relay.port), e.token, key, {"grpc": grpc_srv.port, "steps": step_srv.port},
                                pool=pool)
        made.append(client)
        return e, client

    yield relay, node
    for c in made:
        c.close()
    relay.close()
    grpc_srv.close()
    step_srv.close()


def _wait(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _exchange(port: int, payload: bytes, tag: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = bytearray()
        sender = threading.Thread(target=lambda: (s.sendall(payload), s.shutdown(socket.SHUT_WR)))
        sender.start()
        while chunk := s.recv(1 << 16):
            got += chunk
        sender.join()
    assert bytes(got) == tag + payload


def test_bytes_cross_intact_both_ways_with_half_close(lab):
    relay, node = lab
    e, client = node()
    assert client.connected.wait(5)
    payload = os.urandom(3 << 20)
    _exchange(e.ports["grpc"], payload, b"G")
    _exchange(e.ports["steps"], payload[:1000], b"S")
    _exchange(e.ports["steps"], b"", b"S")
    assert relay.endpoint(e.token).spliced == 3


def test_many_connections_at_once_refill_the_pool(lab):
    relay, node = lab
    e, client = node(pool=2)
    assert client.connected.wait(5)
    errors = []

    def one(i):
        try:
            _exchange(e.ports["grpc" if i % 2 else "steps"], os.urandom(50_000 + i), b"G" if i % 2 else b"S")
        except Exception as ex:  # noqa: BLE001 - reported below
            errors.append(repr(ex))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert relay.endpoint(e.token).spliced == 40
    # The pool is back to its size once the rush is over.
    assert _wait(lambda: len(relay.endpoint(e.token).pool) >= 2)


def test_an_empty_pool_is_refilled_on_demand(lab):
    relay, node = lab
    e, client = node(pool=0)  # keeps none idle: every peer waits for the relay's "open"
    assert client.connected.wait(5)
    assert relay.endpoint(e.token).pool == []
    for _ in range(3):
        _exchange(e.ports["grpc"], b"hello", b"G")


def test_the_control_connection_comes_back(lab):
    relay, node = lab
    e, client = node()
    assert client.connected.wait(5)
    ep = relay.endpoint(e.token)
    first = ep.control
    first.shutdown(socket.SHUT_RDWR)  # the relay's end of it breaks
    assert _wait(lambda: ep.control is not None and ep.control is not first)
    assert _wait(lambda: len(ep.pool) >= 4)
    _exchange(e.ports["grpc"], b"again", b"G")


def test_a_peer_of_a_node_that_is_gone_is_closed_at_once(lab):
    relay, node = lab
    e, client = node()
    assert client.connected.wait(5)
    client.close()
    ep = relay.endpoint(e.token)
    assert _wait(lambda: ep.control is None)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", e.ports["grpc"]), timeout=10) as s:
        s.sendall(b"anyone?")
        try:
            assert s.recv(10) == b""
        except ConnectionResetError:
            pass
    assert time.monotonic() - start < 1.0


def test_a_node_without_the_key_is_refused(lab):
    relay, node = lab
    e, client = node(key="another-key-of-another-swarm")
    assert _wait(lambda: client.refused is not None)
    assert not client.connected.is_set()
    ep = relay.endpoint(e.token)
    assert ep.control is None and ep.pool == []
    # Nor is an unknown token taken, whatever the mac.
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
        s.sendall(rl.REVERSE)
        challenge = rl.recv_frame(s)
        rl.send_frame(s, t="hello", kind="reverse", token="nope", nonce="x",
                      mac=rl.mac(KEY, "reverse", "nope", challenge["nonce"]))
        assert rl.recv_frame(s)["t"] == "refused"


def test_the_key_itself_never_crosses(lab, monkeypatch):
    sent = []
    real = rl.send_frame
    monkeypatch.setattr(rl, "send_frame", lambda sock, **obj: (sent.append(obj), real(sock, **obj))[1])
    relay, node = lab
    e, client = node()
    assert client.connected.wait(5)
    assert sent and not any(KEY in str(v) for obj in sent for v in obj.values())


def test_a_relayed_node_dials_out_through_the_relay_only_to_the_swarms_addresses(lab):
    from swarm import messages as m
    from swarm.layers import LayerRange
    from swarm.wire import dialout, steps

    relay, node = lab
    e, _ = node()
    member = Echo(b"M")  # a peer behind the coordinator's NAT, say
    outsider = Echo(b"O")  # an address of the coordinator's network that is no member
    server = steps.StepServer("127.0.0.1", 0, KEY)  # a member's step stream, reached through the relay
    server.start(lambda step, ctx: m.StepResult(token=step.start))
    members = {("127.0.0.1", member.port), ("127.0.0.1", server.port)}
    relay.allowed = lambda host, port: (host, port) in members
    try:
        dialout.set_via(dialout.Via(("127.0.0.1", relay.port), e.token, frozenset({f"127.0.0.1:{outsider.port}"})))
        with dialout.connect(("127.0.0.1", member.port), timeout=10) as s:  # through the relay, spliced
            s.sendall(b"hi")
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(100):
                got += chunk
            assert got == b"Mhi"
        links = steps.StepLinks(KEY)  # the step stream's own TLS, end to end through the relay
        assert links.call(f"127.0.0.1:{server.port}", m.Step("s", 7, (1,), LayerRange(0, 6)), timeout=10).result().token == 7
        links.close()
        from swarm._proto import swarm_pb2 as pb
        from swarm._proto import swarm_pb2_grpc as pbg
        from swarm.wire import channels

        class Status(pbg.CoordinatorServicer):
            def Status(self, request, context):
                return pb.StatusReply(state="ready")

        srv, port = channels.server("127.0.0.1", 0, KEY)
        pbg.add_CoordinatorServicer_to_server(Status(), srv)
        srv.start()
        members.add(("127.0.0.1", port))
        try:  # gRPC over its own mutual TLS, through the relay (its `grpc.http_proxy`)
            with channels.channel(f"127.0.0.1:{port}", KEY) as ch:
                assert pbg.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=10).state == "ready"
            members.discard(("127.0.0.1", port))  # ... and only through it: refused there, the call fails
            with channels.channel(f"127.0.0.1:{port}", KEY) as ch:
                with pytest.raises(grpc.RpcError):
                    pbg.CoordinatorStub(ch).Status(pb.StatusRequest(), timeout=5)
        finally:
            srv.stop(0)
        with pytest.raises(ConnectionRefusedError, match="403"):  # the relay is no open proxy
            members.discard(("127.0.0.1", member.port))
            dialout.connect(("127.0.0.1", member.port), timeout=10)
        with dialout.connect(("127.0.0.1", outsider.port), timeout=10) as s:  # `direct`: dialled as it is
            assert s.recv(1) == b"O"
        dialout.set_via(dialout.Via(("127.0.0.1", relay.port), "not-a-token", frozenset()))
        with pytest.raises(ConnectionRefusedError, match="407"):
            dialout.connect(("127.0.0.1", server.port), timeout=10)
    finally:
        dialout.set_via(None)
        server.close()
        member.close()
        outsider.close()


def test_a_flood_of_silent_connections_is_closed_at_once_and_nodes_still_get_in(lab):
    relay, node = lab
    silent = [socket.create_connection(("127.0.0.1", relay.port), timeout=5) for _ in range(rl.MAX_PENDING)]
    try:
        assert _wait(lambda: relay._greeting._value == 0)  # every hello slot held by a silent connection
        extra = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
        t0 = time.monotonic()
        assert extra.recv(1) == b"" and time.monotonic() - t0 < 2  # closed at once, not after 10 s
        extra.close()
    finally:
        for s in silent:
            s.close()
    assert _wait(lambda: relay._greeting._value == rl.MAX_PENDING)  # their slots free as they close
    e, client = node()
    assert client.connected.wait(5)
    _exchange(e.ports["grpc"], b"still relayed", b"G")
