"""Fuzzing the wire: random and mutated protobuf messages for every gRPC handler, and raw step-stream frames.

Shared by tests/test_fuzz_wire.py (a short, seeded run in the suite) and scripts/fuzz.py (the long run).
The swarm under test is a real coordinator process (`swarm join --model`) on 127.0.0.1 with a tiny model:
it serves both services (it hosts every layer itself) and a step stream, and a crash shows as its exit.

What counts (see `Tally`): a call that ends with a reply or a clean status is fine; INTERNAL or UNKNOWN
(a handler's exception escaped: a bug), no answer within the deadline (a hang), or a process that
exited (a crash) are failures, and so is a coordinator that no longer answers a normal call afterwards.
"""

from __future__ import annotations

import socket
import ssl
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.descriptor import FieldDescriptor as F
from hypothesis import strategies as st

from procs import Swarm
from swarm._proto import swarm_pb2 as pb
from swarm.wire import steps, tls
from swarm.wire.channels import MAX_MESSAGE
from tiny_models import N_EMBD, N_LAYER, write_tiny_llama

KEY = "fuzz-key-of-the-tests"
OTHER_KEY = "another-swarms-key-for-fuzzing"
SESSION = "fz"
# Statuses a handler may answer with: the request was refused, cleanly. UNAVAILABLE: a peer the request
# named did not answer (the coordinator's own health is checked separately).
CLEAN = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
         grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.PERMISSION_DENIED,
         grpc.StatusCode.UNAUTHENTICATED}


@dataclass
class Tally:
    """Per target: cases tried, and the ones that crashed, hung or broke the server."""

    cases: int = 0
    bugs: list = field(default_factory=list)  # (what, detail): INTERNAL/UNKNOWN answers, bad frames
    hangs: list = field(default_factory=list)
    crashes: list = field(default_factory=list)  # the process died
    answering: bool = True  # the server still answered a normal call at the end
    codes: Counter = field(default_factory=Counter)  # how the cases ended (method and status, or frame)

    def ok(self) -> bool:
        return not (self.bugs or self.hangs or self.crashes) and self.answering

    def line(self, name: str) -> str:
        return (f"{name:<10} cases {self.cases:>6}  crashes {len(self.crashes) + len(self.bugs)}  "
                f"hangs {len(self.hangs)}  still answering: {'yes' if self.answering else 'NO'}")


# ---------------------------------------------------------------- random messages


_U32 = [0, 1, 2, 3, 4, 5, 8, 16, 63, 64, 65, 127, 128, 129, 256, 512, 4096, 65535, 65536, 1 << 20, (1 << 31) - 1,
        1 << 31, (1 << 32) - 1]
_U64 = _U32 + [1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]


def _strings(addresses: list[str]) -> st.SearchStrategy[str]:
    special = ["", SESSION, "n0", "s", "a.gguf", "../../x.gguf", "/etc/passwd", "x" * 129, "\x00", "é\u2603",
               "127.0.0.1:1", "127.0.0.1:0", "host:70000", "[::1]:1", ":", "user", "system", "assistant",
               "{{ raise_exception('x') }}", "{% for x in range(99999999) %}{% endfor %}", *addresses]
    return st.one_of(st.sampled_from(special), st.text(max_size=24))


def _scalar(f, addresses: list[str]) -> st.SearchStrategy:
    t = f.type
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return st.one_of(st.sampled_from(_U32), st.integers(0, (1 << 32) - 1))
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return st.one_of(st.sampled_from(_U64), st.integers(0, (1 << 64) - 1))
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return st.integers(-(1 << 31), (1 << 31) - 1)
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return st.integers(-(1 << 63), (1 << 63) - 1)
    if t == F.TYPE_FLOAT:
        return st.floats(width=32)
    if t == F.TYPE_DOUBLE:
        return st.floats()
    if t == F.TYPE_STRING:
        return _strings(addresses)
    if t == F.TYPE_BYTES:  # hidden states come in rows of N_EMBD float32s: some sizes fit
        return st.one_of(st.binary(max_size=64), st.integers(0, 3).map(lambda k: bytes(4 * N_EMBD * k)),
                         st.integers(1, 3).map(lambda k: b"\xff" * (4 * N_EMBD * k)))
    raise AssertionError(f"no strategy for field type {t}")


def message_strategy(cls, addresses: list[str] = (), depth: int = 0) -> st.SearchStrategy:
    """Messages of `cls` with any subset of fields set to random or edge values (nested ones too)."""
    parts = {}
    for f in cls.DESCRIPTOR.fields:
        if f.type == F.TYPE_MESSAGE:
            if depth >= 3:
                continue
            one = message_strategy(getattr_path(f.message_type), addresses, depth + 1)
        else:
            one = _scalar(f, list(addresses))
        parts[f.name] = st.lists(one, max_size=3) if f.is_repeated else one
    return st.fixed_dictionaries({}, optional=parts).map(lambda values: build(cls, values))


def getattr_path(desc):
    """The generated class of a message descriptor (nested ones too)."""
    names = desc.full_name.split(".")[2:]  # swarm.v1.A.B -> A, B
    out = pb
    for n in names:
        out = getattr(out, n)
    return out


def build(cls, values: dict):
    msg = cls()
    for name, v in values.items():
        f = cls.DESCRIPTOR.fields_by_name[name]
        if f.is_repeated:
            if f.type == F.TYPE_MESSAGE:
                for item in v:
                    getattr(msg, name).add().CopyFrom(item)
            else:
                getattr(msg, name).extend(v)
        elif f.type == F.TYPE_MESSAGE:
            getattr(msg, name).CopyFrom(v)
        else:
            setattr(msg, name, v)
    return msg


_BIG = [0, 1, 0x7F, 0x80, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, (1 << 63) - 1, (1 << 64) - 1]


def mutate(data: bytes, ops: list) -> bytes:
    """Apply byte-level edits: flip a bit, set a byte, insert, delete, cut short, or write a big number."""
    out = bytearray(data)
    for op, at, x in ops:
        at = at % (len(out) + 1)
        if op == "flip" and at < len(out):
            out[at] ^= 1 << (x % 8)
        elif op == "set" and at < len(out):
            out[at] = x % 256
        elif op == "insert":
            out[at:at] = bytes([x % 256]) * (1 + x % 5)
        elif op == "delete":
            del out[at:at + 1 + x % 8]
        elif op == "truncate":
            del out[at:]
        elif op in ("u32", "u64"):
            n, v = (4, _BIG[x % 7]) if op == "u32" else (8, _BIG[x % len(_BIG)])
            out[at:at + n] = (v % (1 << 8 * n)).to_bytes(n, "little")
        elif op == "len":  # a length or count just within what the input's size allows
            out[at:at + 8] = (len(out) - x).to_bytes(8, "little", signed=True)[:8] if len(out) >= x else bytes(8)
        elif op == "varint":  # a protobuf length or number made huge
            out[at:at] = b"\xff\xff\xff\xff\x0f"
    return bytes(out)


def mutations(max_ops: int = 4, hot: list[int] = ()) -> st.SearchStrategy[list]:
    """Lists of edits for `mutate`; `hot`: offsets worth hitting more often (counts, lengths)."""
    at = st.one_of(st.sampled_from(list(hot)), st.integers(0, 1 << 20)) if hot else st.integers(0, 1 << 20)
    return st.lists(st.tuples(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "u32", "u64", "len", "varint"]),
                              at, st.integers(0, 255)), min_size=1, max_size=max_ops)


# ---------------------------------------------------------------- the swarm under test


def methods() -> list[tuple[str, object]]:
    """(service, method descriptor) of every RPC."""
    out = []
    for service in ("Coordinator", "Node"):
        out += [(service, m) for m in pb.DESCRIPTOR.services_by_name[service].methods]
    return out


class Target:
    """A coordinator process with the tiny model, called over gRPC and its step stream."""

    def __init__(self, tmp: Path, hang_s: float = 10.0):
        self.hang_s = hang_s
        model = write_tiny_llama(tmp / "tiny.gguf")
        self.swarm = Swarm(tmp, model, ["--no-http", "--max-sessions", "2"], [], key=KEY, ctx=128,
                           coordinator_env={"SWARM_CACHE_DIR": str(tmp / "cache")})
        self.swarm.wait_ready()
        status = self.swarm.client.status()
        self.address = self.swarm.address
        self.step_address = status["nodes"][0]["step_address"]
        self.channel = grpc.secure_channel(  # mutual TLS with the swarm's certificate: the handlers are the target
            self.address, tls.credentials(KEY).channel_credentials(),
            options=[("grpc.max_receive_message_length", 64 << 20),
                     ("grpc.max_send_message_length", 64 << 20)] + tls.CHANNEL_OPTIONS)
        from swarm.cache import file_digest

        digest = file_digest(model)  # the whole model is the coordinator's shard, loaded where it lies
        self.assign = pb.AssignRequest(has_shard=True, n_ctx=128, max_sessions=2, n_batch=128, shard=pb.ShardSpec(
            shard_id=digest, file_name=model.name, size=model.stat().st_size, sha256=digest,
            layers=pb.LayerSpan(start=0, end=N_LAYER), n_layer_total=N_LAYER))

    @property
    def pid(self) -> int:
        return self.swarm.coordinator.p.pid

    def alive(self) -> bool:
        return self.swarm.coordinator.p.poll() is None

    def close(self) -> None:
        self.channel.close()
        self.swarm.close()

    def log_tail(self, n: int = 3000) -> str:
        return self.swarm.coordinator.text()[-n:]

    # ------------------------------------------------------------ gRPC

    def call(self, service: str, method, requests: list) -> tuple[grpc.StatusCode, str]:
        """Call one RPC (a client stream sends every request, a server stream is read to its end or 64
        replies); the status it ended with."""
        path = f"/swarm.v1.{service}/{method.name}"
        ser, des = (lambda m: m.SerializeToString()), (lambda b: b)
        kw = {"timeout": self.hang_s}
        try:
            if method.client_streaming:
                self.channel.stream_unary(path, ser, des)(iter(requests), **kw)
            elif method.server_streaming:
                replies = self.channel.unary_stream(path, ser, des)(requests[0], **kw)
                for i, _ in enumerate(replies):
                    if i >= 64:
                        replies.cancel()
                        break
            else:
                self.channel.unary_unary(path, ser, des)(requests[0], **kw)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED:  # (our own cancel of a long stream)
                return grpc.StatusCode.OK, ""
            return e.code(), e.details() or ""
        return grpc.StatusCode.OK, ""

    def answers(self) -> bool:
        """A normal request still works: the coordinator's Status and its node's Ping."""
        for service, name, request in (("Coordinator", "Status", pb.StatusRequest()),
                                       ("Node", "Ping", pb.PingRequest(payload=b"x", reply_bytes=8))):
            m = pb.DESCRIPTOR.services_by_name[service].methods_by_name[name]
            if self.call(service, m, [request])[0] != grpc.StatusCode.OK:
                return False
        return True

    def restore(self) -> None:
        """Load the coordinator's shard again if a fuzzed Assign unloaded it (nothing when it is loaded), so
        that the next cases reach past "layers not served"."""
        self.call("Node", pb.DESCRIPTOR.services_by_name["Node"].methods_by_name["Assign"], [self.assign])

    def prepare(self, method_name: str) -> None:
        """Open the session the seeds name (from empty) before a call that needs one, so that mutations of a
        valid step, rewind or import reach the shard rather than "unknown session"."""
        if method_name in ("Forward", "ImportKV", "Rewind", "Resend", "Handoff", "CloseSession"):
            node = pb.DESCRIPTOR.services_by_name["Node"].methods_by_name
            self.call("Node", node["OpenSession"], self.seeds()["OpenSession"])

    def judge(self, tally: Tally, what: str, code: grpc.StatusCode, details: str) -> None:
        tally.cases += 1
        tally.codes[f"{what.split('(', 1)[0]} {code.name}"] += 1
        if not self.alive():
            tally.crashes.append((what, self.log_tail()))
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            tally.hangs.append((what, details))
        elif code not in CLEAN:
            tally.bugs.append((what, f"{code.name}: {details}"))

    def seeds(self, kv: bytes = b"SWARMKV2") -> dict[str, list]:
        """Valid requests per method (mutations of them reach past the first checks); `kv`: a real KV blob of
        the model's whole-model shard, for ImportKV and StoreCheckpoint."""
        layers = pb.LayerSpan(start=0, end=N_LAYER)
        hop = pb.Hop(address=self.address, layers=layers, step_address=self.step_address)
        hidden = bytes(4 * N_EMBD)
        return {
            "Join": [pb.JoinRequest(name="fz", host="127.0.0.1", port=1, step_port=2, version="0.1.0",
                                    resources=pb.NodeResources(memory_total=1 << 30, memory_available=1 << 30,
                                                               threads=1, cpu_count=1))],
            "Heartbeat": [pb.HeartbeatRequest(node_id="n0")],
            "Leave": [pb.LeaveRequest(node_id="n9", graceful=True)],
            "StoreCheckpoint": [pb.Checkpoint(session_id=SESSION, layers=layers, positions=6, kv=kv)],
            "FetchShard": [pb.FetchShardRequest(shard_id=self.assign.shard.shard_id, offset=0)],
            "Generate": [pb.GenerateRequest(prompt="hello", max_tokens=2),
                         pb.GenerateRequest(chat=pb.ChatInput(messages=[pb.ChatMessage(role="user", content="hi")]),
                                            max_tokens=2, stop=["w"])],
            "Status": [pb.StatusRequest()],
            "Assign": [pb.AssignRequest(has_shard=False, drop=pb.LayerSpan(start=1, end=2)), self.assign],
            "OpenSession": [pb.OpenSessionRequest(session_id=SESSION, layers=layers,
                                                  sampling=pb.Sampling(temperature=0.5, top_k=4), history=[1, 2])],
            "CloseSession": [pb.CloseSessionRequest(session_id="gone")],
            "Forward": [pb.ForwardRequest(session_id=SESSION, start=0, n_positions=2, tokens=[1, 5], layers=layers,
                                          sample=True)],
            "Probe": [pb.ProbeRequest(shards=[pb.ShardSpec(shard_id="x", file_name="x.gguf", layers=layers)],
                                      decode_steps=1, prefill_tokens=1),
                      pb.ProbeRequest(shards=[self.assign.shard], decode_steps=2, prefill_tokens=4)],
            "Rewind": [pb.RewindRequest(session_id=SESSION, layers=layers, length=0)],
            "ImportKV": [pb.ImportKVRequest(session_id=SESSION, layers=layers, kv=b"",
                                            kept=[pb.KeptStep(start=0, tokens=[1], hidden=hidden)]),
                         pb.ImportKVRequest(session_id=SESSION, layers=layers, kv=kv, keep_from=6)],
            "Resend": [pb.ResendRequest(session_id=SESSION, layers=layers, from_position=0, to_position=1, to=hop)],
            "Handoff": [pb.HandoffRequest(session_id=SESSION, layers=layers, to=hop)],
            "Ping": [pb.PingRequest(payload=b"abc", reply_bytes=3)],
            "MeasureLink": [pb.LinkRequest(address="127.0.0.1:1", payload_bytes=8, count=1)],
        }

    # ------------------------------------------------------------ the step stream

    def hello(self) -> bytes:
        return steps.MAGIC

    def connect(self, via: str = "tls") -> socket.socket:
        """A step connection: "tls" with the swarm's certificate, "other" with another swarm's (its
        handshake fails), "plain" with no TLS at all. An OSError when the handshake is refused."""
        raw = socket.create_connection(_split(self.step_address), timeout=self.hang_s)
        if via == "plain":
            return raw
        creds = tls.credentials(KEY)
        if via == "other":  # trusts the node, but shows the certificate of another swarm: the node refuses it
            other = tls.credentials(OTHER_KEY)
            creds = tls.Credentials(creds.ca_pem, other.cert_pem, other.key_pem, other.fingerprint)
        try:
            return creds.wrap_client(raw)
        except OSError:
            raw.close()
            raise

    def send_raw(self, data: bytes, via: str = "tls") -> tuple[str, list]:
        """Send `data` on a fresh step connection (see `connect`) and close our sending side; ('closed',
        frames) once the node has answered and closed, ('hang', frames) if it did not within the deadline,
        ('garbled', ...) when what came back is not a sequence of well-formed frames. A refused handshake
        is ('closed', []); on a plain connection what came back (a TLS alert) is not read as frames."""
        frames, buf = [], b""
        try:
            c = self.connect(via)
        except OSError:
            return "closed", []
        with c:
            try:
                c.sendall(data)
                socket.socket.shutdown(c, socket.SHUT_WR)  # TCP half-close under TLS: the node reads its end
            except OSError:
                pass  # the node closed first (it refused the hello): read what it said
            deadline = time.monotonic() + self.hang_s
            while True:
                c.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    got = c.recv(1 << 16)
                except TimeoutError:
                    return "hang", frames
                except (OSError, ssl.SSLError):
                    break  # reset, or a TLS alert: closed
                if not got:
                    break
                buf += got
        if via == "plain":
            return "closed", []
        while buf:
            if len(buf) < 5:
                return "garbled", frames + [buf]
            n, kind = struct.unpack_from("<IB", buf)
            if kind not in (steps.REPLY, steps.ERROR) or len(buf) < 5 + n:
                return "garbled", frames + [buf]
            frames.append((kind, buf[5:5 + n]))
            buf = buf[5 + n:]
        return "closed", frames

    def judge_frames(self, tally: Tally, what: str, outcome: str, frames: list) -> None:
        tally.cases += 1
        tally.codes[" ".join([outcome] + [steps._parse_error(p).code().name if k == steps.ERROR else "REPLY"
                                          for k, p in frames[:2]])] += 1
        if not self.alive():
            tally.crashes.append((what, self.log_tail()))
        elif outcome == "hang":
            tally.hangs.append((what, frames))
        elif outcome == "garbled":
            tally.bugs.append((what, f"garbled answer {frames!r:.300}"))
        else:
            for kind, payload in frames:
                if kind == steps.ERROR:
                    e = steps._parse_error(payload)
                    if e.code() not in CLEAN:
                        tally.bugs.append((what, f"{e.code().name}: {e.details()}"))

    def step_answers(self) -> bool:
        """A valid connection is still served: a step of a session nobody opened is refused cleanly
        (INVALID_ARGUMENT; FAILED_PRECONDITION once a fuzzed Assign has unloaded the layers)."""
        good = pb.ForwardRequest(session_id="nobody", n_positions=1, tokens=[1],
                                 layers=pb.LayerSpan(start=0, end=N_LAYER)).SerializeToString()
        outcome, frames = self.send_raw(self.hello() + struct.pack("<IB", len(good), steps.REQUEST) + good)
        return outcome == "closed" and len(frames) == 1 and frames[0][0] == steps.ERROR and \
            steps._parse_error(frames[0][1]).code() in (grpc.StatusCode.INVALID_ARGUMENT,
                                                        grpc.StatusCode.FAILED_PRECONDITION)

    def step_connections(self) -> int:
        """Step connections the coordinator still holds (each has a serving thread): 0 once callers left."""
        import psutil

        port = _split(self.step_address)[1]
        return sum(1 for c in psutil.Process(self.pid).net_connections("tcp")
                   if c.laddr and c.laddr.port == port and c.status != psutil.CONN_LISTEN)

    def wait_connections_closed(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while (n := self.step_connections()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return n


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host.strip("[]"), int(port)


def step_streams(valid_payload: bytes) -> st.SearchStrategy[tuple[str, bytes]]:
    """(how to connect, what to send) on a step connection: bytes with no TLS at all, anything inside TLS
    (no hello, a mutated request, frames that lie), frames under another swarm's certificate."""
    framed = steps.MAGIC + struct.pack("<IB", len(valid_payload), steps.REQUEST) + valid_payload
    after_hello = frames_strategy(valid_payload).map(lambda frames: steps.MAGIC + frames)
    return st.one_of(
        st.tuples(st.just("plain"), st.binary(max_size=64)),
        st.tuples(st.just("tls"), st.binary(max_size=64)),
        st.tuples(st.just("tls"), mutations().map(lambda ops: mutate(framed, ops))),
        st.tuples(st.just("tls"), after_hello),
        st.tuples(st.just("other"), after_hello),
    )


def frames_strategy(valid_payload: bytes) -> st.SearchStrategy[bytes]:
    """What a step connection might carry after its hello: frames of any kind, lengths that lie (zero, too
    long for what follows, over the limit), payloads random or mutated from a valid step, cut short."""
    payload = st.one_of(st.binary(max_size=64), mutations().map(lambda ops: mutate(valid_payload, ops)),
                        st.just(valid_payload))
    kind = st.one_of(st.sampled_from([steps.REQUEST, steps.REQUEST, steps.REPLY, steps.ERROR, 0]),
                     st.integers(0, 255))

    @st.composite
    def frame(draw):
        data = draw(payload)
        length = draw(st.one_of(st.just(len(data)), st.sampled_from([0, len(data) + 1, len(data) + 1000,
                                                                     MAX_MESSAGE, MAX_MESSAGE + 1, (1 << 32) - 1]),
                                st.integers(0, (1 << 32) - 1)))
        out = struct.pack("<IB", length, draw(kind)) + data
        return out[:draw(st.integers(0, len(out)))] if draw(st.booleans()) and draw(st.booleans()) else out

    return st.lists(frame(), min_size=1, max_size=4).map(b"".join)
