"""The step stream over real localhost sockets, with a stand-in handler (its logic, not llama.cpp)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time

import grpc
import pytest

from swarm import messages as m
from swarm._proto import swarm_pb2 as pb
from swarm.errors import AuthError, BadInputError, CancelledError, PeerError, UnreachableError
from swarm.layers import LayerRange
from swarm.wire import steps, tls
from swarm.wire.channels import split_address
from swarm.wire.convert import step_pb

KEY = "step-key-of-the-tests"


class Served:
    """A step server whose handler answers with the step's start as a token, or does what a test asks."""

    def __init__(self, behave=None, key: str = KEY):
        self.server = steps.StepServer("127.0.0.1", 0, key)
        self.address = f"127.0.0.1:{self.server.port}"
        self.behave = behave
        self.contexts: list[steps.StepContext] = []
        self.server.start(self.handle)

    def handle(self, step: m.Step, context) -> m.StepResult:
        self.contexts.append(context)
        if self.behave is not None:
            out = self.behave(step, context)
            if out is not None:
                return out
        return m.StepResult(token=step.start)

    def close(self):
        self.server.close()


@pytest.fixture
def served():
    made = []

    def make(behave=None, key=KEY):
        s = Served(behave, key)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _step(start=0) -> m.Step:
    return m.Step("s", start, (1,), LayerRange(0, 6))


def _raw(address: str, key: str = KEY) -> socket.socket:
    """A TLS connection of this swarm's key, with no hello sent yet."""
    return tls.credentials(key).wrap_client(socket.create_connection(split_address(address), timeout=10))


def _read_error(conn: socket.socket) -> steps.StepError:
    n, kind = struct.unpack("<IB", steps._recv_exact(conn, 5))
    assert kind == steps.ERROR
    return steps._parse_error(steps._recv_exact(conn, n))


def test_steps_travel_and_reuse_one_connection(served):
    s = served()
    links = steps.StepLinks(KEY)
    for i in range(5):
        assert links.call(s.address, _step(i), timeout=10).result().token == i
    assert len({id(c) for c in s.contexts}) == 1  # one connection served all five
    links.close()


def test_wrong_key_no_certificate_and_no_tls_are_refused_and_the_server_keeps_serving(served):
    s = served()
    with pytest.raises(AuthError, match="not of this swarm's key"):  # another swarm's certificate
        steps.StepLinks("not-the-key-of-this-swarm").call(s.address, _step(), timeout=10).result()
    host, port = split_address(s.address)
    with socket.create_connection((host, port), timeout=10) as c:  # no TLS at all: the hello in clear
        c.sendall(steps.MAGIC + struct.pack("<IB", 0, steps.REQUEST))
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := c.recv(4096):
                got += chunk  # the server ends the connection, having sent at most a TLS alert
        assert steps.MAGIC not in got and len(got) < 100
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # TLS that checks the server but shows no certificate
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=tls.credentials(KEY).ca_pem.decode())
    with anonymous.wrap_socket(socket.create_connection((host, port), timeout=10)) as c:
        with pytest.raises((ssl.SSLError, ConnectionResetError, EOFError)):
            c.sendall(steps.MAGIC + struct.pack("<IB", 0, steps.REQUEST))
            if not c.recv(100):
                raise EOFError
    assert s.contexts == []  # nothing was served
    assert steps.StepLinks(KEY).call(s.address, _step(3), timeout=10).result().token == 3


def test_malformed_frames_get_invalid_argument_and_the_server_keeps_serving(served):
    s = served()
    hello = steps.MAGIC
    with _raw(s.address) as c:  # not a step connection at all
        c.sendall(b"GET / HTTP/1.1\r\n\r\n")
        e = _read_error(c)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "hello" in e.details()
    with _raw(s.address) as c:  # a frame over the limit is refused before it is read
        c.sendall(hello + struct.pack("<IB", 1 << 30, steps.REQUEST))
        e = _read_error(c)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit" in e.details()
    with _raw(s.address) as c:  # a frame of another kind
        c.sendall(hello + struct.pack("<IB", 0, 9))
        assert "not a step request" in _read_error(c).details()
    with _raw(s.address) as c:  # a payload that is not a ForwardRequest; the connection stays usable
        junk = b"\xff" * 7
        c.sendall(hello + struct.pack("<IB", len(junk), steps.REQUEST) + junk)
        assert "not a ForwardRequest" in _read_error(c).details()
        good = step_pb(_step(7)).SerializeToString()
        c.sendall(struct.pack("<IB", len(good), steps.REQUEST) + good)
        n, kind = struct.unpack("<IB", steps._recv_exact(c, 5))
        assert kind == steps.REPLY and pb.ForwardReply.FromString(steps._recv_exact(c, n)).token == 7
    assert steps.StepLinks(KEY).call(s.address, _step(4), timeout=10).result().token == 4


def test_handler_errors_arrive_as_status_codes(served):
    def behave(request, _context):
        if request.start == 1:
            raise BadInputError("unknown session 's' on this node")
        if request.start == 2:
            raise PeerError("next hop 10.0.0.9:1 did not answer")
        if request.start == 3:
            raise RuntimeError("a bug")
        return None

    s = served(behave)
    links = steps.StepLinks(KEY)
    for start, kind, text in ((1, BadInputError, "unknown session"),  # INVALID_ARGUMENT
                              (2, PeerError, "did not answer"),  # UNAVAILABLE, from the node itself
                              (3, PeerError, "INTERNAL: RuntimeError: a bug")):
        with pytest.raises(kind) as e:
            links.call(s.address, _step(start), timeout=10).result()
        assert text in str(e.value) and type(e.value) is kind
    assert links.call(s.address, _step(5), timeout=10).result().token == 5


def test_a_node_that_is_not_there_is_unavailable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(UnreachableError, match="cannot reach the step stream"):
        steps.StepLinks(KEY).call(f"127.0.0.1:{port}", _step(), timeout=5)


def test_a_node_that_dies_mid_step_is_unavailable(served):
    release = threading.Event()
    s = served(lambda r, c: release.wait(10) and None)
    call = steps.StepLinks(KEY).call(s.address, _step(), timeout=10)
    time.sleep(0.2)
    s.close()  # the node goes away with the step in hand
    with pytest.raises(UnreachableError, match="broke"):
        call.result()
    release.set()


def test_no_reply_in_time_is_deadline_exceeded(served):
    release = threading.Event()
    s = served(lambda r, c: release.wait(10) and None)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="deadline_exceeded") as e:
        steps.StepLinks(KEY).call(s.address, _step(), timeout=0.5).result()
    release.set()
    assert type(e.value) is PeerError and time.monotonic() - t0 < 5


def test_cancel_reaches_down_the_route(served):
    """A caller that cancels closes its connection; the hop it called stops waiting on the next one too."""
    release = threading.Event()
    last = served(lambda r, c: release.wait(10) and None)  # hangs, like a stopped node
    outcome = {}

    def middle_hop(step, context):
        call = links.call(last.address, step, timeout=30, caller=context)
        try:
            return call.result()
        except CancelledError:
            outcome["middle"] = "cancelled"
            raise

    links = steps.StepLinks(KEY)
    middle = served(middle_hop)
    call = steps.StepLinks(KEY).call(middle.address, _step(), timeout=30)
    threading.Timer(0.3, call.cancel).start()
    t0 = time.monotonic()
    with pytest.raises(CancelledError):
        call.result()
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while "middle" not in outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert outcome.get("middle") == "cancelled"
    while last.contexts[0].is_active() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not last.contexts[0].is_active()  # the last hop sees its caller gone
    release.set()
    assert call.cancel() is True  # cancelling again is harmless
    links.close()


def test_cancel_after_the_reply_does_nothing(served):
    s = served()
    links = steps.StepLinks(KEY)
    call = links.call(s.address, _step(1), timeout=10)
    assert call.result().token == 1
    assert call.cancel() is False
    assert links.call(s.address, _step(2), timeout=10).result().token == 2  # the pooled connection still works


def test_bad_addresses_and_ports_are_clear_errors():
    with pytest.raises(BadInputError, match="HOST:PORT"):
        steps.StepLinks(KEY).call("nowhere", _step(), timeout=1)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(BadInputError, match="--step-port"):
            steps.StepServer("127.0.0.1", busy.getsockname()[1], KEY)


def test_a_flood_of_silent_connections_is_bounded_and_the_server_keeps_serving(served, monkeypatch):
    monkeypatch.setattr(steps, "HELLO_TIMEOUT_S", 3.0)
    s = served()
    links = steps.StepLinks(KEY)
    assert links.call(s.address, _step(1), timeout=10).result().token == 1  # a connection of the swarm's
    flood = [socket.create_connection(split_address(s.address), timeout=10) for _ in range(steps.MAX_PENDING + 40)]
    try:
        deadline = time.monotonic() + 0.8
        while s.server.refused < 40 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert s.server.refused >= 30 and s.server._pending == steps.MAX_PENDING  # past the limit: closed at once
        for i in range(5):  # the connection it had keeps serving through the flood
            assert links.call(s.address, _step(10 + i), timeout=10).result().token == 10 + i
        with pytest.raises(UnreachableError):  # a new one waits for the flood's handshakes to time out
            steps.StepLinks(KEY).call(s.address, _step(2), timeout=10).result()
        time.sleep(3.5)  # ... which they do, unserved
        assert steps.StepLinks(KEY).call(s.address, _step(3), timeout=10).result().token == 3
    finally:
        for c in flood:
            c.close()
