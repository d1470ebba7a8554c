"""Errors cross the wire once, as gRPC status codes, and become swarm errors again on the other side.

    BadInputError, ShardRangeError, KVStateError, ModelFileError  <->  INVALID_ARGUMENT
    UnsupportedModelError (a chat on a model with no template)     ->  INVALID_ARGUMENT
    ContextFullError                                               <-   RESOURCE_EXHAUSTED
    NotReadyError                                                 <->  FAILED_PRECONDITION
    AuthError                                                     <->  UNAUTHENTICATED
    PeerError                                                      ->  UNAVAILABLE
    UnreachableError (a PeerError)                                <-   UNAVAILABLE
    PeerError                                                     <-   DEADLINE_EXCEEDED
    anything else                                                 <->  INTERNAL
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import grpc

from ..errors import (
    AuthError, BadInputError, ContextFullError, KVStateError, ModelFileError, NotReadyError, PeerError,
    ShardRangeError, SwarmError, UnreachableError, UnsupportedModelError,
)

log = logging.getLogger(__name__)

_INVALID = (BadInputError, ShardRangeError, KVStateError, ModelFileError, UnsupportedModelError)


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


def status_for(e: Exception, name: str) -> tuple[grpc.StatusCode, str]:
    """The status code and message a failed call answers with; logs the unexpected ones (bugs)."""
    if isinstance(e, SwarmError):
        return code_for(e), str(e)
    if isinstance(e, grpc.RpcError):  # a downstream call failed: pass its status on
        return (e.code() if hasattr(e, "code") else grpc.StatusCode.UNAVAILABLE), details(e)
    log.exception("%s failed", name)  # a bug; the node keeps serving
    return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"


# Trailing metadata of a call that ended with the server's own error: the status came from the peer's
# answer, not from a connection that failed (both may be UNAVAILABLE).
ANSWERED = ("swarm-answered", "1")


def _abort(context, e: Exception, name: str) -> None:
    context.set_trailing_metadata((ANSWERED,))
    context.abort(*status_for(e, name))


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


def answered(e: grpc.RpcError) -> bool:
    """Whether a failed call carries the peer's own error (rather than a transport's failure)."""
    if getattr(e, "answered", False):  # a step stream's error frame
        return True
    try:
        return ANSWERED in tuple(e.trailing_metadata() or ())
    except Exception:
        return False


def details(e: grpc.RpcError) -> str:
    try:
        return e.details() or str(e)
    except Exception:
        return str(e)


def from_rpc(e: grpc.RpcError, peer: str) -> SwarmError:
    """The swarm error a failed call stands for, naming the peer."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    text = details(e)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return BadInputError(text)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ContextFullError(text)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        return NotReadyError(text)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(f"{peer} refused the call: {text}")
    if code == grpc.StatusCode.UNAVAILABLE and "CERTIFICATE_VERIFY_FAILED" in text.upper():
        return AuthError(f"{peer} is not of this swarm: its certificate is not signed by this key's authority "
                         "(wrong swarm key? pass the key its coordinator printed)")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        if answered(e):  # the peer answered: it says what failed further on
            return PeerError(text)
        kind = UnreachableError if code == grpc.StatusCode.UNAVAILABLE else PeerError
        return kind(f"{peer} did not answer ({code.name.lower()}): {text}; is it running and reachable?")
    return PeerError(f"{peer} failed: {code.name}: {text}")
