"""gRPC channels and servers that carry the swarm key: every call presents it, every server checks it."""

from __future__ import annotations

import hmac
import re
import secrets
from concurrent import futures

import grpc

from ..errors import BadInputError

KEY_HEADER = "swarm-key"
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


class _KeyClient(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                 grpc.StreamUnaryClientInterceptor):
    """Adds the swarm key to every outgoing call."""

    def __init__(self, key: str):
        self._meta = ((KEY_HEADER, key),)

    def _details(self, details):
        meta = tuple(details.metadata or ()) + self._meta
        return details._replace(metadata=meta)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class KeyCheck(grpc.ServerInterceptor):
    """Refuses every call whose `swarm-key` is missing or wrong, before any handler runs."""

    def __init__(self, key: str):
        self._key = key.encode()

    def intercept_service(self, continuation, details):
        given = dict(details.invocation_metadata or ()).get(KEY_HEADER)
        if given is not None and hmac.compare_digest(given.encode(), self._key):
            return continuation(details)
        message = NO_KEY if given is None else WRONG_KEY
        handler = continuation(details)
        if handler is None:
            return None

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        def refuse_stream(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - abort raises

        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse_stream)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)


def channel(address: str, key: str) -> grpc.Channel:
    """An insecure channel to `address` that presents `key` on every call."""
    raw = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return grpc.intercept_channel(raw, _KeyClient(key))


def server(host: str, port: int, key: str) -> tuple[grpc.Server, int]:
    """A gRPC server bound to host:port (0: any free port) that refuses calls without the key; (server, port)."""
    srv = grpc.server(
        futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="rpc"),
        interceptors=[KeyCheck(key)], options=SERVER_OPTIONS, maximum_concurrent_rpcs=256,
    )
    try:
        bound = srv.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if not bound:
        raise BadInputError(f"cannot listen on {host}:{port}; is the port in use? pick another with --port")
    return srv, bound
