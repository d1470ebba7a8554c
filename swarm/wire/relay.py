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
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import dialout, tls

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
            threading.Thread(target=self._greet, args=(_tune(sock),), name="relay-hello", daemon=True).start()

    def _greet(self, sock: socket.socket) -> None:
        try:
            sock.settimeout(10.0)
            if sock.recv(2, socket.MSG_PEEK) == b"CO":  # an outbound-only node dialling out (dialout.py)
                dialout.serve_connect(sock, lambda t: t in self._endpoints, self.allowed, splice)
                return
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
                return
            if kind == "reverse":
                sock.settimeout(None)
                with self._lock:
                    (e.pool.append if not e.closed else _close)(sock)
                    self._changed.notify_all()
                return
            send_frame(sock, t="ok", mac=mac(self.key, "relay", token, str(hello.get("nonce", ""))))
        except (OSError, ValueError, ConnectionError):
            _close(sock)
            return
        self._serve_control(e, sock)

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


# ---------------------------------------------------------------- the node's side


class RelayClient:
    """Keeps a node reachable through a relay: a control connection and `pool` idle reverse connections,
    each spliced to the node's own server named in "go" (`targets`: name -> local port)."""

    def __init__(self, relay: tuple[str, int], token: str, key: str, targets: dict[str, int], pool: int = POOL,
                 local_host: str = "127.0.0.1"):
        self.relay, self.token, self.key, self.targets, self.pool = relay, token, key, targets, pool
        self.local_host = local_host
        self._lock = threading.Lock()
        self._idle = 0
        self._open: set[socket.socket] = set()  # the control and the idle reverse connections
        self._stop = threading.Event()
        self.connected = threading.Event()
        self.refused: str | None = None
        threading.Thread(target=self._control_loop, name="relay-control", daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            socks, self._open = list(self._open), set()
        _close(*socks, shut=True)

    def _track(self, sock: socket.socket | None, on: bool) -> None:
        with self._lock:
            if sock is not None and on and not self._stop.is_set():
                self._open.add(sock)
            elif sock is not None:
                self._open.discard(sock)
                if on:  # closed meanwhile
                    _close(sock)

    def _dial(self, kind: str) -> socket.socket:
        sock = _tune(socket.create_connection(self.relay, timeout=10.0))
        try:
            if kind == "control":
                sock.sendall(CONTROL)
                try:
                    sock = tls.credentials(self.key).wrap_client(sock)
                except ssl.SSLError as e:
                    raise PermissionError(f"the relay is not of this swarm's key ({e.reason or e})") from None
            else:  # a reverse connection carries a peer's own TLS end to end: no second layer
                sock.sendall(REVERSE)
            challenge = recv_frame(sock)
            nonce = secrets.token_hex(16)
            send_frame(sock, t="hello", kind=kind, token=self.token, nonce=nonce,
                       mac=mac(self.key, kind, self.token, str(challenge.get("nonce"))))
            if kind == "reverse":
                return sock
            reply = recv_frame(sock)
            if reply.get("t") == "refused":
                raise PermissionError(str(reply.get("why")))
            if reply.get("t") != "ok" or not hmac.compare_digest(str(reply.get("mac", "")),
                                                                 mac(self.key, "relay", self.token, nonce)):
                raise PermissionError("the relay does not know the swarm key")
            return sock
        except BaseException:
            _close(sock)
            raise

    def _control_loop(self) -> None:
        backoff = 0.25
        while not self._stop.is_set():
            sock = None
            try:
                sock = self._dial("control")
                self._track(sock, True)
                backoff = 0.25
                self.connected.set()
                self._top_up()
                self._serve(sock)
            except PermissionError as e:
                self.refused = str(e)
                log.warning("relay %s:%d refused this node: %s", *self.relay, e)
            except (OSError, ValueError, ConnectionError) as e:
                log.log(logging.WARNING if backoff == 0.25 else logging.DEBUG, "relay %s:%d: %s; connecting again",
                        *self.relay, e)
            self.connected.clear()
            self._track(sock, False)
            _close(sock)
            self._stop.wait(backoff)
            backoff = min(5.0, backoff * 2)

    def _serve(self, sock: socket.socket) -> None:
        sock.settimeout(PING_S)
        heard = time.monotonic()
        while not self._stop.is_set():
            try:
                frame = recv_frame(sock)
            except socket.timeout:
                if time.monotonic() - heard > SILENT_S:
                    raise ConnectionError("the relay went silent") from None
                send_frame(sock, t="ping")
                continue
            heard = time.monotonic()
            if frame.get("t") == "open":
                self._top_up(int(frame.get("n", 1)))
            elif frame.get("t") == "ping":
                send_frame(sock, t="pong")

    def _top_up(self, more: int = 0) -> None:
        """Open reverse connections up to the pool size, plus `more`."""
        with self._lock:
            n = max(0, self.pool - self._idle) + max(0, more)
            self._idle += n
        for _ in range(n):
            threading.Thread(target=self._reverse, name="relay-reverse", daemon=True).start()

    def _reverse(self) -> None:
        sock = local = None
        idle = True
        try:
            sock = self._dial("reverse")
            self._track(sock, True)
            sock.settimeout(None)
            go = recv_frame(sock)
            self._track(sock, False)
            with self._lock:
                self._idle -= 1
            idle = False
            if not self._stop.is_set():
                self._top_up()
            port = self.targets.get(str(go.get("to")))
            if go.get("t") != "go" or port is None or self._stop.is_set():
                raise ConnectionError(f"unexpected relay frame {go}")
            local = _tune(socket.create_connection((self.local_host, port), timeout=5.0))
        except (OSError, ValueError, ConnectionError):
            if idle:
                with self._lock:
                    self._idle -= 1
            self._track(sock, False)
            _close(sock, local)
            return
        splice(sock, local)
