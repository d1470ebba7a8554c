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

A connection opens with a hello, then carries one step at a time, each answered before the next:

    hello:  b"SWSTEP1\\0", u16 key length, the swarm key (UTF-8)
    frame:  u32 payload length, u8 kind, payload     (little-endian)
            kind 1: ForwardRequest    (caller -> node)
            kind 2: ForwardReply      (node -> caller)
            kind 3: error             (node -> caller): u8 gRPC status code, UTF-8 message

A caller cancels a step by closing its connection; the node notices while it waits on the next hop
(the step it sent on watches the connection it came from), closes that connection too, and rolls its
step back. A wrong key, a frame over `MAX_MESSAGE`, or
an unknown kind gets an error frame and the connection closed; a request that does not parse gets an
error frame and the connection stays usable. The node keeps serving every other connection.
"""

from __future__ import annotations

import contextlib
import hmac
import select
import socket
import struct
import threading
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from .. import messages as m
from .._proto import swarm_pb2 as pb
from ..errors import BadInputError, CancelledError, SwarmError
from .channels import MAX_MESSAGE, NO_KEY, WRONG_KEY, split_address
from .codes import from_rpc, status_for
from .convert import step_of, step_pb, step_result_of, step_result_pb

MAGIC = b"SWSTEP1\0"
REQUEST, REPLY, ERROR = 1, 2, 3
_HEAD = struct.Struct("<IB")
_HELLO = struct.Struct("<8sH")
_MAX_KEY = 1024
HELLO_TIMEOUT_S = 10.0  # an unauthenticated connection may not hold a thread longer
MAX_CONNECTIONS = 256
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
        self._key = key.encode()
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
                full = len(self._conns) >= MAX_CONNECTIONS
                if not full:
                    self._conns.add(conn)
            if full:
                with contextlib.suppress(OSError):
                    conn.sendall(_error_frame(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                              f"this node serves at most {MAX_CONNECTIONS} step connections"))
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), name="step", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._hello(conn):
                self._steps(conn)
        except (OSError, EOFError):
            pass  # the caller went away
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _hello(self, conn: socket.socket) -> bool:
        conn.settimeout(HELLO_TIMEOUT_S)
        magic, n = _HELLO.unpack(_recv_exact(conn, _HELLO.size))
        if magic != MAGIC:
            conn.sendall(_error_frame(grpc.StatusCode.INVALID_ARGUMENT,
                                      "not a step connection: it must open with the step stream's hello"))
            return False
        if n > _MAX_KEY:
            conn.sendall(_error_frame(grpc.StatusCode.INVALID_ARGUMENT, f"a swarm key is at most {_MAX_KEY} bytes"))
            return False
        given = _recv_exact(conn, n)
        if not hmac.compare_digest(given, self._key):
            conn.sendall(_error_frame(grpc.StatusCode.UNAUTHENTICATED, WRONG_KEY if n else NO_KEY))
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
        self._hello = _HELLO.pack(MAGIC, len(key.encode())) + key.encode()
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
                conn = socket.create_connection(split_address(address), timeout=min(timeout, 10.0))
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError as e:
                raise from_rpc(StepError(grpc.StatusCode.UNAVAILABLE,
                                         f"cannot reach the step stream at {address}: {e.strerror or e}"),
                               where) from None
            head = self._hello
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
