"""The step stream: pipeline steps between peers over TCP connections kept open.

Everything else in the swarm is gRPC. A pipeline step is the one exchange made once per generated token
on every hop of the route, and in Python gRPC a unary call wakes four to six threads on its way (the
server's poller, a handler thread, the poller again for the message, the client's channel thread...);
on a machine whose cores are busy computing, each wake-up costs a scheduling delay. Here the thread that
serves a connection sleeps in the kernel until the request arrives, and the caller's thread sleeps in
the kernel until the reply does: one wake-up on each side. The messages are the protocol's own
`ForwardRequest` and `ForwardReply`; errors carry gRPC status codes (`codes.py`), and a caller gets them
back as the swarm errors they stand for, as from a gRPC call. Handlers and callers speak
`messages.Step` and `messages.StepResult`.

A connection is TLS 1.3 with certificates checked on both ends (`tls.py`: only holders of the swarm key
get through the handshake; the key itself is never sent). It opens with a hello, then carries one step
at a time, each answered before the next:

    hello:  b"SWSTEP2\\0"
    frame:  u32 payload length, u8 kind, payload     (little-endian)
            kind 1: ForwardRequest    (caller -> node)
            kind 2: ForwardReply      (node -> caller)
            kind 3: error             (node -> caller): u8 gRPC status code, UTF-8 message

A caller cancels a step by closing its connection; the node notices while it waits on the next hop
(the step it sent on watches the connection it came from), closes that connection too, and rolls its
step back. A peer without a certificate of the swarm's key fails the handshake; a frame over
`MAX_MESSAGE`, or an unknown kind gets an error frame and the connection closed; a request that does not parse gets an
error frame and the connection stays usable. The node keeps serving every other connection.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from .. import messages as m
from .._proto import swarm_pb2 as pb
from ..errors import BadInputError, CancelledError, SwarmError
from . import dialout, tls
from .channels import MAX_MESSAGE, split_address
from .codes import from_rpc, status_for
from .convert import step_of, step_pb, step_result_of, step_result_pb

log = logging.getLogger(__name__)

MAGIC = b"SWSTEP2\0"
REQUEST, REPLY, ERROR = 1, 2, 3
_HEAD = struct.Struct("<IB")
HELLO_TIMEOUT_S = 10.0  # a connection may not hold a thread longer before its handshake and hello
MAX_CONNECTIONS = 256
MAX_PENDING = 32  # connections not through their handshake and hello yet (each for HELLO_TIMEOUT_S at most)
_CODES = {c.value[0]: c for c in grpc.StatusCode}


class StepError(grpc.RpcError):
    """A step that failed on the far side (`answered`: the node's own error frame) or on the way."""

    def __init__(self, code: grpc.StatusCode, details: str, answered: bool = False):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details, self.answered = code, details, answered

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


_RECV_CHUNK = 1 << 20


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    if n > _RECV_CHUNK:  # memory follows the bytes that arrive, not the length a frame claims
        parts = []
        while n > 0:
            parts.append(_recv_exact(conn, min(n, _RECV_CHUNK)))
            n -= len(parts[-1])
        return b"".join(parts)
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise EOFError("the connection closed")
        got += k
    return bytes(buf)


def _refused(e: BaseException) -> bool:
    """A TLS alert about our certificate (not a connection that broke)."""
    return isinstance(e, ssl.SSLError) and not isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)) \
        and any(w in str(e).upper() for w in ("CERTIFICATE", "UNKNOWN_CA", "ALERT"))


def _tls_reason(e: OSError) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return "its certificate is not of this swarm's key (a wrong --key, or another swarm)"
    if isinstance(e, ssl.SSLError):
        return f"it refused this swarm key's certificate ({e.reason or e}): a wrong --key, or another swarm"
    return str(e.strerror or e)


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload), kind) + payload


def _error_frame(code: grpc.StatusCode, details: str) -> bytes:
    return _frame(ERROR, bytes([code.value[0]]) + details.encode("utf-8", "replace"))


def _read_frame(conn: socket.socket) -> tuple[int, int]:
    """The next frame's kind and length; the payload is still to be read."""
    n, kind = _HEAD.unpack(_recv_exact(conn, _HEAD.size))
    return kind, n


def _parse_error(payload: bytes) -> StepError:
    code = _CODES.get(payload[0], grpc.StatusCode.UNKNOWN) if payload else grpc.StatusCode.UNKNOWN
    return StepError(code, payload[1:].decode("utf-8", "replace"), answered=True)


# ---------------------------------------------------------------- serving


class StepContext:
    """The caller of a step being served: gone once its connection has closed (it cancelled).

    Pass it as `caller` to a step sent on, so that the caller's going away cancels that one too."""

    def __init__(self, conn: socket.socket):
        self._conn = conn
        self._gone = False

    def fileno(self) -> int:
        return self._conn.fileno()

    def is_active(self) -> bool:
        if not self._gone:
            # The caller sends nothing while its step runs: anything readable means it closed.
            ready, _, _ = select.select([self._conn], [], [], 0)
            self._gone = bool(ready)
        return not self._gone


class StepServer:
    """Listens for step connections and serves each one on a thread of its own.

    Bound on construction (so its port can be announced before serving starts); `start` begins
    serving with `handler(step, context) -> StepResult`.
    """

    def __init__(self, host: str, port: int, key: str):
        self._creds = tls.credentials(key)
        family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
        try:
            self._sock = socket.create_server((host.strip("[]") or "0.0.0.0", port), family=family, backlog=64)
        except OSError as e:
            raise BadInputError(
                f"cannot listen for steps on {host}:{port} ({e.strerror or e}); pick another port with --step-port"
            ) from None
        self.port = self._sock.getsockname()[1]
        self._handler: Callable[[m.Step, StepContext], m.StepResult] | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._pending = 0  # connections in their TLS handshake or hello
        self._warned = 0.0
        self.refused = 0  # connections closed unserved because of the limits

    def start(self, handler: Callable[[m.Step, StepContext], m.StepResult]) -> None:
        self._handler = handler
        threading.Thread(target=self._accept_loop, name="steps", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                time.sleep(0.05)  # out of file descriptors, for one: try again shortly
                continue
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS or self._pending >= MAX_PENDING
                if not full:
                    self._conns.add(conn)
                    self._pending += 1
            if full:  # closed before TLS: a caller of the swarm sees the connection refused and says so
                self.refused += 1
                if time.monotonic() - self._warned > 60:
                    self._warned = time.monotonic()
                    log.warning("step stream: refusing connections (%d open, %d in their handshake; at most %d and "
                                "%d): a flood?", len(self._conns), self._pending, MAX_CONNECTIONS, MAX_PENDING)
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="step", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn.settimeout(HELLO_TIMEOUT_S)
            plain = conn
            try:
                conn = self._creds.wrap_server(conn)  # without the swarm's certificate: ends here
                ok = self._hello(conn)
            finally:
                with self._lock:
                    self._pending -= 1
                    if conn is not plain:
                        self._conns.discard(plain)
                        self._conns.add(conn)
            if ok:
                self._steps(conn)
        except (OSError, EOFError):
            pass  # the caller went away, or failed the handshake
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _hello(self, conn: socket.socket) -> bool:
        conn.settimeout(HELLO_TIMEOUT_S)
        if _recv_exact(conn, len(MAGIC)) != MAGIC:
            conn.sendall(_error_frame(grpc.StatusCode.INVALID_ARGUMENT,
                                      "not a step connection: it must open with the step stream's hello"))
            return False
        conn.settimeout(None)
        return True

    def _steps(self, conn: socket.socket) -> None:
        context = StepContext(conn)
        while not self._closed:
            kind, n = _read_frame(conn)
            if kind != REQUEST:
                conn.sendall(_error_frame(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"frame kind {kind} is not a step request (kind {REQUEST})"))
                return
            if n > MAX_MESSAGE:
                conn.sendall(_error_frame(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"a step of {n} bytes is over the limit of {MAX_MESSAGE}; send the "
                                          "prompt in smaller batches"))
                return
            payload = _recv_exact(conn, n)
            try:
                request = pb.ForwardRequest.FromString(payload)
            except DecodeError:
                conn.sendall(_error_frame(grpc.StatusCode.INVALID_ARGUMENT,
                                          f"a step request of {n} bytes is not a ForwardRequest message"))
                continue
            try:
                out = _frame(REPLY, step_result_pb(self._handler(step_of(request), context)).SerializeToString())
            except Exception as e:
                out = _error_frame(*status_for(e, "step"))
            # A caller that cancelled has closed its end: this reply is never read, and the next read
            # here ends the connection.
            conn.sendall(out)


# ---------------------------------------------------------------- calling


class StepCall:
    """One step sent on its way: `result()` waits for the reply, `cancel()` stops waiting (any thread)."""

    def __init__(self, links: "StepLinks", address: str, conn: socket.socket, deadline: float, where: str,
                 watch: StepContext | None):
        self._links, self._address, self._conn, self._deadline = links, address, conn, deadline
        self._where, self._watch = where, watch
        self._lock = threading.Lock()
        self._state = "running"  # then: done, cancelled

    def cancel(self) -> bool:
        with self._lock:
            if self._state != "running":
                return self._state == "cancelled"
            self._state = "cancelled"
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RDWR)  # wakes the thread waiting in result()
        return True

    def result(self) -> m.StepResult:
        """The reply; the swarm error the far side answered with, PeerError when the step got no answer,
        CancelledError when it was cancelled (here, or by the caller it continues)."""
        try:
            return self._wait()
        except StepError as e:
            raise from_rpc(e, self._where) from None

    def _wait(self) -> m.StepResult:
        conn, watch = self._conn, self._watch
        poller = select.poll()
        poller.register(conn, select.POLLIN)
        if watch is not None:
            poller.register(watch.fileno(), select.POLLIN)
        try:
            while True:
                left = self._deadline - time.monotonic()
                if left <= 0:
                    self._end()
                    raise StepError(grpc.StatusCode.DEADLINE_EXCEEDED, "no reply to the step in time")
                events = poller.poll(left * 1e3)
                if self._state == "cancelled":
                    break
                if watch is not None and any(fd == watch.fileno() for fd, _ in events):
                    self.cancel()  # our own caller gave up
                    break
                if events:
                    conn.settimeout(max(self._deadline - time.monotonic(), 1e-3))  # a reply cut short
                    kind, n = _read_frame(conn)
                    if kind not in (REPLY, ERROR) or n > MAX_MESSAGE:
                        self._end()
                        raise StepError(grpc.StatusCode.INTERNAL, f"the node answered a step with frame kind {kind}")
                    payload = _recv_exact(conn, n)
                    conn.settimeout(None)
                    with self._lock:
                        if self._state == "cancelled":
                            break
                        self._state = "done"
                    if kind == ERROR:  # rare: a new connection next time, whatever the node did with this one
                        conn.close()
                        raise _parse_error(payload)
                    self._links._release(self._address, conn)
                    try:
                        return step_result_of(pb.ForwardReply.FromString(payload))
                    except (DecodeError, SwarmError):
                        raise StepError(grpc.StatusCode.INTERNAL, "the node's reply is not a ForwardReply") from None
        except (OSError, EOFError) as e:
            cancelled = self._state == "cancelled"
            self._end()
            if cancelled:
                raise CancelledError(f"the step to {self._where} was cancelled") from None
            if _refused(e):
                raise StepError(grpc.StatusCode.UNAUTHENTICATED,
                                f"the step stream at {self._address} refused us: {_tls_reason(e)}") from None
            raise StepError(grpc.StatusCode.UNAVAILABLE, f"the step connection to {self._address} broke: {e}") from None
        self._end()
        raise CancelledError(f"the step to {self._where} was cancelled")

    def _end(self) -> None:
        with self._lock:
            if self._state == "running":
                self._state = "cancelled"
        self._conn.close()


class StepLinks:
    """Step connections to other nodes, opened on first use and kept for the next step."""

    def __init__(self, key: str):
        self._creds = tls.credentials(key)
        self._idle: dict[str, list[socket.socket]] = {}
        self._lock = threading.Lock()

    def call(self, address: str, step: m.Step, timeout: float, caller=None, where: str = "") -> StepCall:
        """Send one step to the node whose step stream listens at `address`.

        `caller`: the context of the step this one continues (a StepContext, or a gRPC call's context):
        when that caller goes away, this step is cancelled too. `where` names the node in errors."""
        where = where or f"the node at {address}"
        payload = step_pb(step).SerializeToString()
        if len(payload) > MAX_MESSAGE:
            raise BadInputError(f"a step of {len(payload)} bytes is over the limit of {MAX_MESSAGE}")
        deadline = time.monotonic() + timeout
        with self._lock:
            idle = self._idle.get(address)
            conn = idle.pop() if idle else None
        head = b""
        if conn is None:
            try:
                raw = dialout.connect(split_address(address), timeout=min(timeout, 10.0))
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError as e:
                raise from_rpc(StepError(grpc.StatusCode.UNAVAILABLE,
                                         f"cannot reach the step stream at {address}: {e.strerror or e}"),
                               where) from None
            try:
                conn = self._creds.wrap_client(raw)
            except OSError as e:
                raw.close()
                code = grpc.StatusCode.UNAUTHENTICATED if _refused(e) else grpc.StatusCode.UNAVAILABLE
                raise from_rpc(StepError(code, f"the TLS handshake with {address} failed: {_tls_reason(e)}"),
                               where) from None
            conn.settimeout(None)
            head = MAGIC
        try:
            conn.sendall(head + _frame(REQUEST, payload))
        except OSError as e:
            conn.close()
            raise from_rpc(StepError(grpc.StatusCode.UNAVAILABLE,
                                     f"the step connection to {address} broke: {e.strerror or e}"), where) from None
        watch = caller if isinstance(caller, StepContext) else None
        call = StepCall(self, address, conn, deadline, where, watch)
        if caller is not None and watch is None and not caller.add_callback(call.cancel):
            call.cancel()  # a gRPC caller that has already gone
        return call

    def _release(self, address: str, conn: socket.socket) -> None:
        with self._lock:
            self._idle.setdefault(address, []).append(conn)

    def forget(self, address: str) -> None:
        """Close the idle connections to a node that left or failed."""
        with self._lock:
            conns = self._idle.pop(address, [])
        for c in conns:
            c.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for c in conns:
                c.close()
