"""Dialling out through the relay: how a node behind NAT reaches peers it cannot reach itself.

A notebook session reaches the coordinator at the address the user gave it (a port forward, a tunnel),
but not the other machines of a home network behind the same router, nor the coordinator's own LAN
addresses that the route names. So a node the coordinator relays for dials every peer except the
coordinator's address it joined at through the relay, with HTTP CONNECT (RFC 9110, 9.3.6), the one
proxy protocol gRPC speaks itself (its `grpc.http_proxy` channel argument):

    node -> relay   CONNECT HOST:PORT HTTP/1.1
                    Proxy-Authorization: Basic base64(<relay token>:)
    relay -> node   HTTP/1.1 200 Connection established      then the peer's bytes, both ways
                    (407: unknown token; 403: not an address of the swarm; 502: the peer did not answer)

The connection that follows is the peer's own mutual TLS, end to end. The relay connects only to
addresses of the swarm's members (it is no open proxy into the coordinator's network), and only for a
token it gave out at a join (a secret that travelled inside TLS).
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

MAX_HEAD = 4096
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Via:
    """This process's way out: peers other than `direct` are dialled through the relay at `relay`."""

    relay: tuple[str, int]
    token: str
    direct: frozenset[str]  # HOST:PORT dialled as they are (the coordinator, at the address joined at)


_lock = threading.Lock()
_via: Via | None = None


def set_via(via: Via | None) -> None:
    """Dial through a relay from now on (None: directly again). Connections already open stay as they are."""
    global _via
    with _lock:
        _via = via


def via_for(address: str) -> Via | None:
    """The relay to dial `address` through, or None to dial it directly."""
    via = _via
    return None if via is None or address in via.direct else via


def grpc_options(address: str) -> list[tuple[str, object]]:
    """gRPC channel arguments that send a channel to `address` through the relay, when it must be."""
    via = via_for(address)
    if via is None:
        return []
    return [("grpc.http_proxy", f"http://{via.token}:@{via.relay[0]}:{via.relay[1]}")]


def _head(sock: socket.socket) -> bytes:
    """The head of a CONNECT request or reply, read a byte at a time: the bytes after it (a server that
    speaks first) belong to the tunnel and must stay in the socket."""
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        if len(head) >= MAX_HEAD:
            raise ValueError("a CONNECT head over 4 KB")
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("the connection closed in its CONNECT head")
        head += chunk
    return bytes(head)


def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """A TCP connection to `address`, through the relay when this process must dial out through it."""
    via = via_for(f"{address[0]}:{address[1]}")
    if via is None:
        return socket.create_connection(address, timeout=timeout)
    sock = socket.create_connection(via.relay, timeout=timeout)
    try:
        auth = base64.b64encode(f"{via.token}:".encode()).decode()
        sock.sendall(f"CONNECT {address[0]}:{address[1]} HTTP/1.1\r\nHost: {address[0]}:{address[1]}\r\n"
                     f"Proxy-Authorization: Basic {auth}\r\n\r\n".encode())
        status = _head(sock).split(b"\r\n", 1)[0]
        if status.split(b" ")[1:2] != [b"200"]:
            raise ConnectionRefusedError(f"the relay would not connect to {address[0]}:{address[1]}: "
                                         f"{status.decode(errors='replace')}")
        return sock
    except BaseException:
        sock.close()
        raise


def serve_connect(sock: socket.socket, known_token: Callable[[str], bool], allowed: Callable[[str, int], bool],
                  splice: Callable[[socket.socket, socket.socket], None]) -> None:
    """(The relay's side.) Answer one CONNECT on `sock`: check the token and the target, connect, splice."""
    def answer(status: str) -> None:
        try:
            sock.sendall(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n".encode())
        finally:
            sock.close()

    try:
        sock.settimeout(10.0)
        lines = _head(sock).decode("latin-1").split("\r\n")
        method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        scheme, _, credentials = fields.get("proxy-authorization", "").partition(" ")
        try:
            token = base64.b64decode(credentials, validate=True).decode().partition(":")[0]
        except ValueError:
            token = ""
        host, _, port = target.rpartition(":")
        if method != "CONNECT" or not port.isdigit():
            return answer("400 Bad Request")
        if scheme.lower() != "basic" or not known_token(token):
            return answer("407 Proxy Authentication Required")
        if not allowed(host.strip("[]"), int(port)):
            log.warning("relay: refused to connect a node to %s, not an address of the swarm", target)
            return answer("403 Forbidden")
        try:
            peer = socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S)
        except OSError:
            return answer("502 Bad Gateway")
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    except (OSError, ValueError, ConnectionError):
        sock.close()
        return
    splice(sock, peer)
