"""Reverse connections through a relay, for nodes that accept no inbound connection (behind NAT).

The relay (in the coordinator's process) listens on one port for nodes and, per outbound-only node, on two
ports that stand for the node's gRPC server and its step stream. The node keeps a control connection and
a few idle reverse connections to the relay; a peer that connects to one of its relay ports is handed an
idle reverse connection, the relay says "go" and which server, the node connects to that server locally,
and bytes are copied both ways until either side closes: gRPC, the step stream or TLS inside see one TCP
connection. Frames and the HMAC hello: docs/protocol.md, "The relay".
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import dialout, tls
from .steps import HELLO_TIMEOUT_S, MAX_PENDING  # the step stream's bounds on a hello hold here too

log = logging.getLogger(__name__)

POOL = 4  # idle reverse connections a node keeps open
WAIT_S = 5.0  # how long a peer's connection waits for a reverse connection (or a new node to connect)
PING_S = 5.0
SILENT_S = 15.0  # a control connection silent this long is dead
MAX_FRAME = 4096
TARGETS = ("grpc", "steps")
CONTROL, REVERSE = b"C", b"R"  # a connection's first byte: a control connection (TLS follows) or a reverse one


def mac(key: str, *parts: str) -> str:
    return hmac.new(key.encode(), "|".join(("swarm-relay", *parts)).encode(), hashlib.sha256).hexdigest()


def send_frame(sock: socket.socket, **obj) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        out += sock.recv(n - len(out)) or _closed()
    return out


def _closed() -> bytes:
    raise ConnectionError("connection closed")


def recv_frame(sock: socket.socket) -> dict:
    (n,) = struct.unpack(">I", _exact(sock, 4))
    if n > MAX_FRAME:
        raise ConnectionError(f"relay frame of {n} bytes")
    obj = json.loads(_exact(sock, n))
    return obj if isinstance(obj, dict) else {}


def _tune(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, opt):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
    return sock


def _shut(*socks: socket.socket | None) -> None:
    """Shut both directions down (wakes a thread blocked on the socket)."""
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except (OSError, AttributeError):
            pass


def _close(*socks: socket.socket | None, shut: bool = False) -> None:
    if shut:
        _shut(*socks)
    for s in socks:
        if s is not None:
            s.close()


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)  # (select() fails past fd 1023)
    return bool(poller.poll(0))


def splice(a: socket.socket, b: socket.socket) -> None:
    """Copy bytes both ways until both directions ended (a half-close is passed on), then close both."""
    a.settimeout(None)
    b.settimeout(None)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # one side broke: end both directions
            _shut(a, b)

    other = threading.Thread(target=pump, args=(b, a), name="relay-splice", daemon=True)
    other.start()
    pump(a, b)
    other.join()
    _close(a, b)


# ---------------------------------------------------------------- the relay


@dataclass
class Endpoint:
    """One outbound-only node as the relay serves it."""

    token: str
    name: str
    listeners: dict[str, socket.socket]
    ports: dict[str, int]
    control: socket.socket | None = None
    pool: list[socket.socket] = field(default_factory=list)
    spliced: int = 0  # peer connections carried so far
    seen: bool = False  # the node has connected once (before that, peers wait for it)
    closed: bool = False


class Relay:
    """Relays peers' connections to outbound-only nodes. `host` is where it listens, `port` the nodes' port."""

    def __init__(self, host: str, port: int, key: str):
        self.key, self.host = key, host
        # Where a relayed node may dial out through the relay: the swarm's members (the coordinator sets it).
        self.allowed: Callable[[str, int], bool] = lambda host, port: False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._endpoints: dict[str, Endpoint] = {}
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._greeting = threading.BoundedSemaphore(MAX_PENDING)  # connections in their hello
        threading.Thread(target=self._accept_nodes, name="relay", daemon=True).start()

    # ------------------------------------------------------------ endpoints

    def open(self, name: str) -> Endpoint:
        """New listening ports for a node; its token goes to the node."""
        listeners = {t: socket.create_server((self.host, 0)) for t in TARGETS}
        e = Endpoint(secrets.token_hex(16), name, listeners, {t: s.getsockname()[1] for t, s in listeners.items()})
        with self._lock:
            self._endpoints[e.token] = e
        for target, s in listeners.items():
            threading.Thread(target=self._accept_peers, args=(e, target, s), name=f"relay-{name}",
                             daemon=True).start()
        log.info("relaying for %s on ports %d (gRPC) and %d (steps)", name, e.ports["grpc"], e.ports["steps"])
        return e

    def drop(self, token: str) -> None:
        with self._lock:
            e = self._endpoints.pop(token, None)
            if e is None:
                return
            e.closed = True
            socks = [*e.listeners.values(), e.control, *e.pool]
            e.pool.clear()
            self._changed.notify_all()
        _close(*socks, shut=True)

    def endpoint(self, token: str) -> Endpoint | None:
        return self._endpoints.get(token)

    def close(self) -> None:
        self._closed = True
        _close(self._sock)
        for token in list(self._endpoints):
            self.drop(token)

    # ------------------------------------------------------------ nodes

    def _accept_nodes(self) -> None:
        while not self._closed:
            try:
                sock, _ = self._sock.accept()
            except OSError:
                return
            if not self._greeting.acquire(blocking=False):  # MAX_PENDING in their hello: a flood
                _close(sock)
                continue
            threading.Thread(target=self._greet, args=(_tune(sock),), name="relay-hello", daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        done = threading.Event()

        def release() -> None:  # once: the slot frees when the hello is over, whatever comes next
            if not done.is_set():
                done.set()
                self._greeting.release()

        try:
            e, sock = self._hello(sock, release)
        except (OSError, ValueError, ConnectionError):
            _close(sock)
            return
        finally:
            release()
        if e is not None:
            self._serve_control(e, sock)

    def _hello(self, sock: socket.socket, release: Callable[[], None]) -> tuple[Endpoint | None, socket.socket]:
        """A node's connection up to its hello; (endpoint, TLS socket) when it is a control connection."""
        sock.settimeout(HELLO_TIMEOUT_S)
        if sock.recv(2, socket.MSG_PEEK) == b"CO":  # an outbound-only node dialling out (dialout.py)
            dialout.serve_connect(sock, lambda t: t in self._endpoints, self.allowed,
                                  lambda a, b: (release(), splice(a, b)))
            return None, sock
        first = _exact(sock, 1)
        if first == CONTROL:  # control frames travel in mutual TLS, like every link of the swarm
            sock = tls.credentials(self.key).wrap_server(sock)
        elif first != REVERSE:
            raise ValueError("not a relay connection")
        nonce = secrets.token_hex(16)
        send_frame(sock, t="challenge", nonce=nonce)
        hello = recv_frame(sock)
        kind, token = str(hello.get("kind")), str(hello.get("token"))
        with self._lock:
            e = self._endpoints.get(token)
        if e is None or kind not in ("control", "reverse") or not hmac.compare_digest(
                str(hello.get("mac", "")), mac(self.key, kind, token, nonce)):
            send_frame(sock, t="refused", why="unknown token or wrong swarm key")
            _close(sock)
            return None, sock
        if kind == "reverse":
            sock.settimeout(None)
            with self._lock:
                (e.pool.append if not e.closed else _close)(sock)
                self._changed.notify_all()
            return None, sock
        send_frame(sock, t="ok", mac=mac(self.key, "relay", token, str(hello.get("nonce", ""))))
        return e, sock

    def _serve_control(self, e: Endpoint, sock: socket.socket) -> None:
        with self._lock:
            old, e.control, e.seen = e.control, sock, True
            if e.closed:
                old, e.control = sock, None
            self._changed.notify_all()
        _close(old)
        log.info("relay: %s connected", e.name)
        sock.settimeout(SILENT_S)
        try:
            while True:
                frame = recv_frame(sock)
                if frame.get("t") == "ping":
                    send_frame(sock, t="pong")
        except (OSError, ValueError, ConnectionError):
            pass
        with self._lock:
            if e.control is not sock:
                return
            e.control = None
            pool, e.pool = e.pool, []
            self._changed.notify_all()
        _close(sock, *pool)  # idle reverse connections of a node that is gone are no use
        log.info("relay: %s disconnected (%d connections relayed to it)", e.name, e.spliced)

    # ------------------------------------------------------------ peers

    def _accept_peers(self, e: Endpoint, target: str, listener: socket.socket) -> None:
        while not e.closed:
            try:
                peer, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._carry, args=(e, target, _tune(peer)), name="relay-peer",
                             daemon=True).start()

    def _reverse(self, e: Endpoint) -> socket.socket | None:
        """An idle reverse connection of the node; asks it for more when few are left. None: none came."""
        deadline = time.monotonic() + WAIT_S
        asked = False
        with self._lock:
            while True:
                while e.pool:
                    sock = e.pool.pop()
                    if _readable(sock):  # readable while idle: closed by the node or the network
                        _close(sock)
                        continue
                    if len(e.pool) < POOL // 2 and e.control is not None:
                        self._ask(e, POOL - len(e.pool))
                    return sock
                if e.closed or (e.control is None and e.seen) or time.monotonic() >= deadline:
                    return None
                if not asked and e.control is not None:
                    self._ask(e, POOL)
                    asked = True
                self._changed.wait(min(0.2, max(0.0, deadline - time.monotonic())))

    def _ask(self, e: Endpoint, n: int) -> None:
        """(lock held) ask the node for `n` more reverse connections."""
        try:
            send_frame(e.control, t="open", n=n)
        except (OSError, AttributeError):
            pass

    def _carry(self, e: Endpoint, target: str, peer: socket.socket) -> None:
        while True:
            rev = self._reverse(e)
            if rev is None:  # the node is gone: close at once, as a dead host would
                _close(peer)
                return
            try:
                send_frame(rev, t="go", to=target)
                break
            except OSError:
                _close(rev)
        with self._lock:
            e.spliced += 1
        splice(peer, rev)
