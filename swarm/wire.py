"""The wire boundary: channels, the swarm key, error translation, and protobuf <-> swarm types.

Protobuf messages stay here and in the servicers; everything above speaks LayerRange, SamplingParams
and numpy arrays. Errors cross the wire once, as gRPC status codes:

    BadInputError, ShardRangeError, KVStateError, ModelFileError  <->  INVALID_ARGUMENT
    NotReadyError                                                 <->  FAILED_PRECONDITION
    AuthError                                                     <->  UNAUTHENTICATED
    PeerError                                                     <->  UNAVAILABLE, DEADLINE_EXCEEDED
    anything else                                                 <->  INTERNAL
"""

from __future__ import annotations

import functools
import hmac
import logging
import os
import re
import secrets
from typing import Callable, Iterable, Iterator

import grpc
import numpy as np

from ._proto import swarm_pb2 as pb
from .errors import (
    AuthError,
    BadInputError,
    ContextFullError,
    KVStateError,
    ModelFileError,
    NotReadyError,
    PeerError,
    ShardRangeError,
    SwarmError,
)
from .layers import LayerRange
from .sampling import SamplingParams

log = logging.getLogger(__name__)

KEY_HEADER = "swarm-key"
# gRPC's own limit sits above any legitimate message (a 512-position batch of a 16k-wide model is
# 32 MB), so that oversized requests reach the handlers and get a precise INVALID_ARGUMENT there, and
# low enough that unkeyed callers (checked only once a message has arrived) cannot make a node buffer much.
MAX_MESSAGE = 64 << 20
CHANNEL_OPTIONS = [
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

_INVALID = (BadInputError, ShardRangeError, KVStateError, ModelFileError)
# KV states (checkpoints, handovers) can be far larger than a message: they travel in pieces of this size.
KV_PIECE = int(os.environ.get("SWARM_KV_PIECE_BYTES") or 8 << 20)
MAX_KV_STATE = 64 << 30


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


# ---------------------------------------------------------------- the key


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
        message = (
            "this swarm needs its key: pass --key KEY or set SWARM_KEY (the coordinator printed it when it started)"
            if given is None else
            "wrong swarm key: this peer belongs to a swarm with another key; pass the key its coordinator printed"
        )
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


# ---------------------------------------------------------------- errors


def code_for(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, _INVALID):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, NotReadyError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, AuthError):
        return grpc.StatusCode.UNAUTHENTICATED
    if isinstance(exc, PeerError):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


def served(method: Callable) -> Callable:
    """Wrap a unary servicer method: swarm errors become status codes, nothing escapes as a crash."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            _abort(context, e, method.__name__)

    return wrapper


def served_stream(method: Callable) -> Callable:
    """Like `served`, for a method that yields its replies."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            yield from method(self, request, context)
        except Exception as e:
            _abort(context, e, method.__name__)

    return wrapper


def _abort(context, e: Exception, name: str) -> None:
    """End a call with the status `e` stands for; raises, as context.abort does."""
    context.abort(*status_for(e, name))


def status_for(e: Exception, name: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with; logs the unexpected ones (bugs)."""
    if isinstance(e, SwarmError):
        return code_for(e), str(e)
    if isinstance(e, grpc.RpcError):  # a downstream call failed: pass its status on
        return (e.code() if hasattr(e, "code") else grpc.StatusCode.UNAVAILABLE), _details(e)
    log.exception("%s failed", name)  # a bug; the node keeps serving
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


def _details(e: grpc.RpcError) -> str:
    try:
        return e.details() or str(e)
    except Exception:
        return str(e)


def from_rpc(e: grpc.RpcError, peer: str) -> SwarmError:
    """The swarm error a failed call stands for, naming the peer."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    text = _details(e)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadInputError(text)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ContextFullError(text)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return NotReadyError(text)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(f"{peer} refused the call: {text}")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return PeerError(f"{peer} did not answer ({code.name.lower()}): {text}; is it running and reachable?")
    return PeerError(f"{peer} failed: {code.name}: {text}")


# ---------------------------------------------------------------- conversions


def span(r: LayerRange) -> pb.LayerSpan:
    return pb.LayerSpan(start=r.start, end=r.end)


def layer_range(s: pb.LayerSpan) -> LayerRange:
    return LayerRange(int(s.start), int(s.end))


def sampling_to_pb(p: SamplingParams) -> pb.Sampling:
    return pb.Sampling(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        repeat_penalty=p.repeat_penalty, repeat_last_n=p.repeat_last_n,
        has_seed=p.seed is not None, seed=p.seed or 0,
    )


def sampling_from_pb(s: pb.Sampling) -> SamplingParams:
    """Validated sampling parameters (BadInputError names the bad field)."""
    # proto3 leaves unset numbers at 0: top_p 0 and repeat_penalty 0 mean "off", as 1.0 does.
    return SamplingParams(
        temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p) or 1.0, min_p=float(s.min_p),
        repeat_penalty=float(s.repeat_penalty) or 1.0, repeat_last_n=int(s.repeat_last_n),
        seed=int(s.seed) if s.has_seed else None,
    )


def kv_pieces(first, blob: bytes, kept: Iterable = ()) -> Iterator:
    """`first` (a Checkpoint or ImportKVRequest, every field but `kv` set) with the first piece of `blob`,
    then messages of its type with the rest, then the kept steps (ImportKVRequest) a piece's worth at a time."""
    make = type(first)
    for at in range(0, max(len(blob), 1), KV_PIECE):
        message = first if at == 0 else make()
        message.kv = blob[at:at + KV_PIECE]
        yield message
    group, size = [], 0
    for step in kept:
        group.append(step)
        size += len(step.hidden)
        if size >= KV_PIECE:
            yield make(kept=group)
            group, size = [], 0
    if group:
        yield make(kept=group)


def join_kv_pieces(messages: Iterable):
    """The inverse of kv_pieces: (the first message, with every piece's kept steps; the whole blob)."""
    first, parts, total = None, [], 0
    for message in messages:
        total += len(message.kv)
        if total > MAX_KV_STATE:
            raise BadInputError(f"a KV state is at most {MAX_KV_STATE >> 30} GB")
        parts.append(message.kv)
        if first is None:
            first = message
        elif hasattr(message, "kept"):
            first.kept.extend(message.kept)
    if first is None:
        raise BadInputError("a KV state needs at least one message")
    return first, parts[0] if len(parts) == 1 else b"".join(parts)


def encode_hidden(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<f4").tobytes()


def decode_hidden(data: bytes, n_positions: int, n_embd: int) -> np.ndarray:
    """Hidden states from bytes, after checking the size matches the positions and the model width."""
    expected = n_positions * n_embd * 4
    if len(data) != expected:
        raise BadInputError(
            f"wrong hidden-state size: {len(data)} bytes for {n_positions} positions, but this model's "
            f"hidden states are {n_embd} float32 values ({n_embd * 4} bytes) per position, {expected} in all"
        )
    return np.frombuffer(data, dtype="<f4").reshape(n_positions, n_embd).astype(np.float32, copy=False)
