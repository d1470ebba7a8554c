"""gRPC channels and servers of the swarm: mutual TLS with certificates of the swarm key's authority (tls.py)."""

from __future__ import annotations

import re
import secrets
from concurrent import futures

import grpc

from ..errors import BadInputError
from . import dialout, tls

# gRPC's own limit sits above any legitimate message (a 512-position batch of a 16k-wide model is
# 32 MB), so that oversized requests reach the handlers and get a precise INVALID_ARGUMENT there, and
# low enough that unkeyed callers (checked only once a message has arrived) cannot make a node buffer much.
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [
    # A peer that went away and comes back (a restarted coordinator) is dialled again within 2 s; gRPC's
    # own backoff grows to 120 s, and a node then waited minutes to re-join a coordinator that was back.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.server_handshake_timeout_ms", 10_000),  # a connection that does not finish its TLS handshake
    ("grpc.so_reuseport", 0),
]
NO_KEY = "this swarm needs its key: pass --key KEY or set SWARM_KEY (the coordinator printed it when it started)"
WRONG_KEY = "wrong swarm key: this peer belongs to a swarm with another key; pass the key its coordinator printed"


def new_key() -> str:
    """A fresh random swarm key (never one that starts with "-", which a command line takes for an option)."""
    while True:
        key = secrets.token_urlsafe(18)
        if not key.startswith("-"):
            return key


def check_address(address: str) -> str:
    """HOST:PORT as given by a user or a peer; a clear error otherwise."""
    m = re.fullmatch(r"\[?([A-Za-z0-9_.:-]+?)\]?:(\d{1,5})", address.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise BadInputError(f"cannot read address {address!r}; write it as HOST:PORT, e.g. 192.168.1.20:7700")
    return address.strip()


def split_address(address: str) -> tuple[str, int]:
    host, _, port = check_address(address).rpartition(":")
    return host.strip("[]"), int(port)


def channel(address: str, key: str) -> grpc.Channel:
    """A mutual-TLS channel to `address`, with this process's certificate of the swarm of `key`."""
    return grpc.secure_channel(address, tls.credentials(key).channel_credentials(),
                               options=CHANNEL_OPTIONS + tls.CHANNEL_OPTIONS + dialout.grpc_options(address))


def server(host: str, port: int, key: str) -> tuple[grpc.Server, int]:
    """A gRPC server bound to host:port (0: any free port) that serves only peers holding a certificate of
    the swarm of `key` (mutual TLS); (server, port)."""
    creds = tls.credentials(key).server_credentials()
    srv = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
        options=SERVER_OPTIONS, maximum_concurrent_rpcs=256,
    )
    try:
        bound = srv.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError:
        bound = 0
    if not bound:
        raise BadInputError(f"cannot listen on {host}:{port}; is the port in use? pick another with --port")
    return srv, bound
