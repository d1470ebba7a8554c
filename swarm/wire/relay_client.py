"""The node's side of the relay (`relay.py`): a node that accepts no inbound connection keeps a control
connection and a few idle reverse connections open to the coordinator's relay, and splices each reverse
connection the relay hands a peer to its own gRPC server or step stream. Frames and the HMAC hello:
docs/protocol.md, "The relay".
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import ssl
import threading
import time

from . import tls
from .relay import CONTROL, PING_S, POOL, REVERSE, SILENT_S, _close, _tune, mac, recv_frame, send_frame, splice

log = logging.getLogger(__name__)


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
