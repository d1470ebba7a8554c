"""The coordinator: membership, placement, shard files, and the generation loop of every session.

It owns the model file and the tokenizer. It plans placement (a pure function in placement.py) whenever
the membership changes and no session is running, tells each node what to load, and drives each session
step by step. Hidden states flow node to node; only token ids come back here.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import statistics
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc

from . import placement, planner, wire
from .cache import file_digest
from ._proto import swarm_pb2 as pb
from ._proto import swarm_pb2_grpc as pbg
from .engine import Tokenizer
from .errors import BadInputError, NotReadyError, ShardRangeError, SwarmError
from .gguf_file import read_gguf
from .layers import LayerRange
from .node import FORWARD_TIMEOUT_S, NodeService
from .sampling import SamplingParams
from .slicing import model_layer_count, slice_model
from .textstream import TextStream, check_stops
from .transfer import fault_chunks_from_env, iter_chunks
from .profiling import ComputeProfile, measure_link

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0
LOST_AFTER_S = 3.5  # three missed heartbeats and a margin
RETRY_S = 30.0  # a node that failed to be measured or to load is planned for again after this
PROBE_TIMEOUT_S = 600.0  # fetching the probe slices and timing them
ASSIGN_TIMEOUT_S = 1800.0  # fetching a multi-GB shard over Wi-Fi takes a while
MAX_PROMPT_CHARS = 1 << 20
MAX_MESSAGES = 1024


@dataclass
class Member:
    """A node as the coordinator knows it (mutable; guarded by the coordinator's lock)."""

    node_id: str
    name: str
    address: str
    resources: pb.NodeResources
    pin: LayerRange | None
    is_self: bool = False
    last_seen: float = field(default_factory=time.monotonic)
    layers: LayerRange | None = None
    state: str = "joining"
    detail: str = ""
    excluded_until: float = 0.0  # failed to be measured or to load: left out of plans until then
    compute: ComputeProfile | None = None  # measured by a probe when it joined
    profile_cached: bool = False
    rtt_s: float = 0.0  # to the coordinator
    bandwidth_bps: float = float("inf")
    reason: str = ""  # the planner's word on this node

    def __post_init__(self) -> None:
        # Plan with what the node had free when it joined: once it holds a shard, its free memory
        # no longer counts that shard, and re-plans would shrink it for nothing.
        self.plan_resources = self.resources

    def usable_memory(self) -> int:
        """What the planner may fill: the cap when given (never more than is free), else 90% of free."""
        r = self.plan_resources
        if r.max_memory:
            return min(r.max_memory, r.memory_available) if r.memory_available else r.max_memory
        return int(r.memory_available * 0.9)


@dataclass(frozen=True)
class RouteHop:
    node_id: str
    address: str
    layers: LayerRange
    is_self: bool


@dataclass
class _Session:
    route: tuple[RouteHop, ...]
    started: float = field(default_factory=time.monotonic)
    positions: int = 0
    generated: int = 0


class Coordinator:
    """The swarm's brain; thread-safe. `serve()` in join.py puts it on the network."""

    def __init__(
        self,
        model_path: Path,
        *,
        swarm: str,
        key: str,
        name: str,
        address: str,
        resources: pb.NodeResources,
        pin: LayerRange | None = None,
        n_ctx: int = 2048,
        max_sessions: int = 4,
        n_batch: int = 512,
        threads: int | None = None,
        default_max_tokens: int = 256,
        reprofile: bool = False,
    ):
        self.model_path = Path(model_path)
        self.swarm, self.key = swarm, key
        model = read_gguf(self.model_path)
        self.n_layer = model_layer_count(model)
        if self.n_layer < 3:
            raise BadInputError(f"{self.model_path.name} has {self.n_layer} layers; a swarm needs a model of at least 3")
        self.footprint = placement.footprint(model)
        if pin is not None:
            pin.check_within(self.n_layer)
        self.tokenizer = Tokenizer(self.model_path)
        self.n_ctx, self.max_sessions, self.n_batch = n_ctx, max_sessions, min(n_batch, n_ctx)
        self.default_max_tokens = default_max_tokens
        self.local = NodeService(key, fetcher=lambda: self.fetch_chunks, threads=threads, progress=False)
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        me = Member("n0", name, address, resources, pin, is_self=True)
        self._members: dict[str, Member] = {me.node_id: me}
        self._route: tuple[RouteHop, ...] | None = None
        self._state, self._detail = "planning", "planning placement"
        self._dirty = True
        self._files: dict[str, Path] = {}
        self._sessions: dict[str, _Session] = {}
        self._slots = threading.Semaphore(max_sessions)
        self._waiting = 0
        self._stubs: dict[str, tuple[pbg.NodeStub, grpc.Channel]] = {}
        self._faults = fault_chunks_from_env()
        self._links: dict[tuple[str, str], tuple[float, float]] = {}
        self._prediction: planner.Prediction | None = None
        self._measured: collections.deque[float] = collections.deque(maxlen=20)
        self.reprofile = reprofile
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._plan_loop, name="planner", daemon=True),
            threading.Thread(target=self._watch_loop, name="heartbeats", daemon=True),
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------ membership

    def join(self, request: pb.JoinRequest, peer_host: str) -> pb.JoinReply:
        name = request.name.strip()
        if not name or len(name) > 64:
            raise BadInputError("a node name is 1 to 64 characters (--name)")
        if not 0 < request.port < 65536:
            raise BadInputError(f"port {request.port} is not a TCP port")
        host = request.host or peer_host
        address = wire.check_address(f"{host}:{request.port}")
        pin = wire.layer_range(request.pin) if request.has_pin else None
        if pin is not None:
            pin.check_within(self.n_layer)
        with self._cond:
            # A node that restarts comes back at the same address: it replaces its old self.
            for old in [m for m in self._members.values() if m.address == address and not m.is_self]:
                del self._members[old.node_id]
                self._on_member_gone(old, "restarted")
            for m in self._members.values():
                if pin is not None and m.pin is not None and pin.start < m.pin.end and m.pin.start < pin.end:
                    raise ShardRangeError(
                        f"layers {pin} overlap {m.pin}, already pinned to node {m.name} ({m.address}); "
                        "pin a range that no other node holds"
                    )
            member = Member(f"n{next(self._ids)}", name, address, request.resources, pin)
            self._members[member.node_id] = member
            self._dirty = True
            self._cond.notify_all()
        log.info("node %s joined from %s (%s MB for the swarm%s)", name, address,
                 member.usable_memory() >> 20, f", pinned to {pin}" if pin else "")
        return pb.JoinReply(node_id=member.node_id, heartbeat_interval_s=HEARTBEAT_S, model_name=self.model_path.name)

    def heartbeat(self, request: pb.HeartbeatRequest) -> pb.HeartbeatReply:
        with self._cond:
            m = self._members.get(request.node_id)
            if m is None:
                return pb.HeartbeatReply(known=False)
            m.last_seen = time.monotonic()
            if request.HasField("resources"):
                devices = list(m.resources.devices)  # sent once, at join
                m.resources = request.resources
                if not m.resources.devices:
                    m.resources.devices.extend(devices)
            return pb.HeartbeatReply(known=True)

    def leave(self, node_id: str) -> None:
        with self._cond:
            m = self._members.get(node_id)
            if m is None or m.is_self:
                return
            del self._members[node_id]
            self._on_member_gone(m, "left")

    def _on_member_gone(self, m: Member, why: str) -> None:
        """Call with the lock held."""
        self._forget_stub(m.address)
        log.log(logging.INFO if why in ("left", "restarted") else logging.WARNING,"node %s (%s) %s%s", m.name, m.address, why, f"; it held layers {m.layers}" if m.layers else "")
        if m.layers is not None and self._route is not None:
            self._route = None
            self._state, self._detail = "planning", f"node {m.name} {why}; re-planning layers {m.layers}"
        self._dirty = True
        self._cond.notify_all()

    def _watch_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S / 2):
            now = time.monotonic()
            with self._cond:
                for m in self._members.values():
                    if m.excluded_until and m.excluded_until <= now:
                        m.excluded_until, m.compute = 0.0, None  # measure it again from scratch
                        self._dirty = True
                        self._cond.notify_all()
                for m in list(self._members.values()):
                    if not m.is_self and now - m.last_seen > LOST_AFTER_S:
                        del self._members[m.node_id]
                        self._on_member_gone(m, f"missed its heartbeats for {now - m.last_seen:.1f} s")

    # ------------------------------------------------------------ placement

    def _plan_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._dirty:
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                now = time.monotonic()
                members = [m for m in self._members.values() if m.excluded_until <= now]
            try:
                # Newcomers are measured while the current route keeps serving.
                self._measure(members)
            except SwarmError as e:
                log.warning("%s", e)
            except Exception:
                log.exception("measuring nodes failed")
            with self._cond:
                # Re-plan only between sessions: a running session keeps the route it started with.
                while not self._stop.is_set() and not (self._dirty and not self._sessions):
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                self._dirty = False
                # No session may start on the old route while it is being replaced.
                self._route = None
                self._state, self._detail = "planning", "planning placement"
            time.sleep(0.2)  # let a burst of joins settle into one plan
            with self._cond:
                if self._dirty:
                    continue
                now = time.monotonic()
                members = [m for m in self._members.values() if m.excluded_until <= now]
            try:
                self._apply(members)
            except Exception as e:  # the planner must survive anything, or the swarm never serves again
                with self._cond:
                    self._route = None
                    self._state, self._detail = "waiting", str(e)
                    self._cond.notify_all()
                if isinstance(e, placement.PlacementError):  # waiting for nodes is normal at start-up
                    log.info("%s", e)
                elif isinstance(e, SwarmError):
                    log.warning("%s", e)
                else:
                    log.exception("planning failed; retrying shortly")
                    with self._cond:
                        self._dirty = True
                    self._stop.wait(2.0)

    def _shard_spec(self, layers: LayerRange) -> pb.ShardSpec:
        """Cut (or reuse) the shard of `layers` and offer its file for FetchShard."""
        shard = slice_model(self.model_path, layers)
        spec = pb.ShardSpec(
            shard_id=shard.shard_id, file_name=shard.path.name, size=shard.path.stat().st_size,
            sha256=file_digest(shard.path), layers=wire.span(layers), n_layer_total=self.n_layer,
        )
        with self._cond:
            self._files[spec.shard_id] = shard.path
        return spec

    def _measure(self, members: list[Member]) -> None:
        """Profile members not yet measured: compute on slices of this model, and their link to here."""
        todo = [m for m in members if m.compute is None]
        if not todo:
            return
        # Two middle slices: one layer, and as many more (up to 6) as fit a small budget, so that a
        # big model's probe stays far below any node's memory (a 70B layer alone is ~0.5 GB).
        budget = min(256 << 20, min(m.usable_memory() for m in todo) // 8)
        k, size = 1, self.footprint.layer_bytes[1]
        while k < min(6, self.n_layer - 2) and size + self.footprint.layer_bytes[1 + k] <= budget:
            size += self.footprint.layer_bytes[1 + k]
            k += 1
        ranges = [LayerRange(1, 2)] + ([LayerRange(1, 1 + k)] if k > 1 else [])
        probe = pb.ProbeRequest(shards=[self._shard_spec(r) for r in ranges], decode_steps=32, prefill_tokens=128)

        def one(m: Member) -> None:
            request = pb.ProbeRequest()
            request.CopyFrom(probe)
            request.refresh = m.is_self and self.reprofile
            if m.is_self:
                reply = self.local.probe(request)
                m.rtt_s, m.bandwidth_bps = 0.0, float("inf")
            else:
                stub = self._stub(m.address)
                try:
                    reply = stub.Probe(request, timeout=PROBE_TIMEOUT_S)
                    m.rtt_s, m.bandwidth_bps = measure_link(lambda r: stub.Ping(r, timeout=10.0),
                                                            self.footprint.n_embd * 4)
                except grpc.RpcError as e:
                    raise wire.from_rpc(e, f"node {m.name} ({m.address})") from None
            m.compute = ComputeProfile(reply.decode_s_per_byte, reply.prefill_s_per_byte, reply.step_overhead_s)
            m.profile_cached = reply.cached
            log.info("measured %s: %.2f ns/byte decode, %.2f ms per step, %.2f ms round trip%s", m.name,
                     1e9 * reply.decode_s_per_byte, 1e3 * reply.step_overhead_s, 1e3 * m.rtt_s,
                     " (compute from its cache)" if reply.cached else "")

        with self._cond:
            self._detail = "measuring " + ", ".join(m.name for m in todo)
        failed = []
        # One node at a time: nodes that share a machine (a local swarm, or two nodes on one box)
        # would otherwise measure each other's load instead of their own speed.
        for m in todo:
            try:
                one(m)
            except SwarmError as e:
                m.state, m.detail = "failed", f"could not be measured: {e}; trying again in {RETRY_S:.0f} s"
                m.excluded_until = time.monotonic() + RETRY_S
                failed.append(f"{m.name}: {e}")
        if failed:
            with self._cond:
                self._dirty = True
            raise NotReadyError("some nodes could not be measured; planning without them: " + "; ".join(failed))

    def _profiles(self, members: list[Member]) -> list[planner.NodeProfile]:
        return [
            planner.NodeProfile(
                node_id=m.node_id, memory=m.usable_memory(), decode_s_per_byte=m.compute.decode_s_per_byte,
                prefill_s_per_byte=m.compute.prefill_s_per_byte, step_overhead_s=m.compute.step_overhead_s,
                rtt_s=m.rtt_s, bandwidth_bps=m.bandwidth_bps, pin=m.pin, is_coordinator=m.is_self,
                memory_total=m.plan_resources.memory_total, memory_free=m.plan_resources.memory_available,
            )
            for m in members
        ]

    def _apply(self, members: list[Member]) -> None:
        self._measure(members)  # anyone who joined since the measuring pass
        current = {m.node_id: m.layers for m in members if m.layers is not None}
        plan = planner.plan_measured(self.footprint, self._profiles(members), self.n_ctx, self.max_sessions,
                                     self.n_batch, links=dict(self._links), current=current)
        by_id = {m.node_id: m for m in members}
        for m in members:
            m.reason = plan.reasons.get(m.node_id, "")
        log.info("placement: %s", ", ".join(f"{a.layers} -> {by_id[a.node_id].name}" for a in plan.assignments))
        with self._cond:
            self._route = None
            self._state, self._detail = "planning", "loading shards: " + placement.describe(plan)
        jobs = {}
        for a in plan.assignments:
            spec = self._shard_spec(a.layers)
            jobs[a.node_id] = pb.AssignRequest(
                has_shard=True, shard=spec, n_ctx=self.n_ctx, max_sessions=self.max_sessions, n_batch=self.n_batch,
            )
        for node_id in plan.idle:
            jobs[node_id] = pb.AssignRequest(has_shard=False)
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            futures = {node_id: pool.submit(self._assign, by_id[node_id], req) for node_id, req in jobs.items()}
            failed = []
            for node_id, fut in futures.items():
                m = by_id[node_id]
                try:
                    fut.result()
                    m.layers = wire.layer_range(jobs[node_id].shard.layers) if jobs[node_id].has_shard else None
                    m.state, m.detail = ("ready" if m.layers else "idle"), ""
                except SwarmError as e:
                    m.state, m.detail = "failed", str(e)
                    failed.append(f"{m.name}: {e}")
        if failed:
            with self._cond:
                for m in members:  # leave failed nodes out of plans for a while, then try them again
                    if m.state == "failed":
                        m.excluded_until = time.monotonic() + RETRY_S
                self._dirty = True
            raise NotReadyError("some nodes could not load their shards; re-planning without them: " + "; ".join(failed))
        route = tuple(
            RouteHop(a.node_id, by_id[a.node_id].address, a.layers, by_id[a.node_id].is_self) for a in plan.assignments
        )
        prediction = self._measure_route(route, plan, members)
        with self._cond:
            self._prediction = prediction
            self._measured.clear()
            if self._dirty:
                return  # the membership changed while loading; the next plan supersedes this one
            self._route = route
            self._state, self._detail = "ready", placement.describe(plan)
            self._cond.notify_all()
        log.info("swarm ready: %s", ", ".join(f"{h.layers} on {by_id[h.node_id].name}" for h in route))

    def _measure_route(self, route, plan, members: list[Member]) -> planner.Prediction:
        """Measure the links between consecutive nodes of the new route; the prediction with them."""
        for a, b in zip(route, route[1:]):
            if a.is_self or b.is_self or (a.node_id, b.node_id) in self._links:
                continue  # a link from here is the node's own, measured when it joined
            try:
                reply = self._stub(a.address).MeasureLink(
                    pb.LinkRequest(address=b.address, payload_bytes=min(self.footprint.n_embd * 4, 1 << 16), count=8),
                    timeout=60.0)
                self._links[(a.node_id, b.node_id)] = (reply.rtt_s, reply.bandwidth_bps)
            except grpc.RpcError as e:
                log.warning("could not measure the link %s -> %s: %s", a.address, b.address, e.details())
        return planner.predict(self.footprint, self._profiles(members), plan.assignments, self.n_batch,
                               links=dict(self._links))

    def _assign(self, m: Member, request: pb.AssignRequest) -> None:
        m.state = "loading" if request.has_shard else m.state
        if m.is_self:
            self.local.assign(request)
            return
        try:
            self._stub(m.address).Assign(request, timeout=ASSIGN_TIMEOUT_S)
        except grpc.RpcError as e:
            raise wire.from_rpc(e, f"node {m.name} ({m.address})") from None

    def fetch_chunks(self, request: pb.FetchShardRequest) -> Iterator[pb.ShardChunk]:
        """A shard file the coordinator serves, from `request.offset` on."""
        with self._cond:
            path = self._files.get(request.shard_id)
            faults, self._faults = self._faults, frozenset()  # injected corruption happens once
        if path is None:
            raise BadInputError(f"no shard {request.shard_id[:16]!r} here; it is not part of the current plan")
        return iter_chunks(path, int(request.offset), corrupt_chunks=faults)

    def _forget_stub(self, address: str) -> None:
        entry = self._stubs.pop(address, None)
        if entry is not None:
            entry[1].close()

    def _stub(self, address: str) -> pbg.NodeStub:
        with self._cond:
            if address not in self._stubs:
                ch = wire.channel(address, self.key)
                self._stubs[address] = (pbg.NodeStub(ch), ch)
            return self._stubs[address][0]

    # ------------------------------------------------------------ generation

    def wait_ready(self, timeout: float, is_active: Callable[[], bool] = lambda: True) -> tuple[RouteHop, ...]:
        """The current route, waiting up to `timeout` s for one; NotReadyError says what is missing."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._route is None:
                left = deadline - time.monotonic()
                if left <= 0 or not is_active() or self._stop.is_set():
                    raise NotReadyError(f"the swarm is not ready: {self._detail}")
                self._cond.wait(min(left, 0.5))
            return self._route

    def generate(self, request: pb.GenerateRequest, is_active: Callable[[], bool], wait_s: float = 120.0
                 ) -> Iterator[pb.GenerateEvent]:
        """Run one session: prompt in n_batch pieces, then one token per step, streaming text pieces."""
        sampling = wire.sampling_from_pb(request.sampling) if request.HasField("sampling") else SamplingParams()
        stops = check_stops(request.stop)  # counts before it copies
        tokens = self._prompt_tokens(request)
        if len(tokens) >= self.n_ctx:
            raise BadInputError(
                f"the prompt is {len(tokens)} tokens but a session holds {self.n_ctx}; shorten it or start the "
                "coordinator with a larger --ctx"
            )
        budget = min(request.max_tokens or self.default_max_tokens, self.n_ctx - len(tokens))
        deadline = time.monotonic() + wait_s
        with self._cond:
            # Each waiting request holds a server thread; a bounded queue keeps heartbeats served.
            if self._waiting >= 2 * self.max_sessions:
                raise NotReadyError(f"the swarm is busy ({self.max_sessions} sessions running, more waiting); "
                                    "try again shortly")
            self._waiting += 1
        try:
            while not self._slots.acquire(timeout=0.5):
                if time.monotonic() > deadline or not is_active():
                    raise NotReadyError(f"all {self.max_sessions} session slots are busy; try again shortly")
        finally:
            with self._cond:
                self._waiting -= 1
        sid = uuid.uuid4().hex[:16]
        route: tuple[RouteHop, ...] = ()
        try:
            with self._cond:  # the planner sees the session as soon as the route is taken
                route = self.wait_ready(max(0.0, deadline - time.monotonic()), is_active)
                session = self._sessions[sid] = _Session(route)
            yield from self._run(sid, session, tokens, budget, sampling, stops, request.timings, is_active)
        finally:
            self._close_everywhere(sid, route)
            with self._cond:
                self._sessions.pop(sid, None)
                self._cond.notify_all()
            self._slots.release()

    def _prompt_tokens(self, request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "prompt":
            if not request.prompt:
                raise BadInputError("the prompt is empty")
            if len(request.prompt) > MAX_PROMPT_CHARS:
                raise BadInputError(f"the prompt is longer than {MAX_PROMPT_CHARS} characters")
            return self.tokenizer.tokenize(request.prompt)
        if kind == "chat":
            if len(request.chat.messages) > MAX_MESSAGES:
                raise BadInputError(f"a conversation has at most {MAX_MESSAGES} messages")
            messages = [(m.role, m.content) for m in request.chat.messages]
            if not messages:
                raise BadInputError("a chat request needs at least one message")
            if sum(len(c) for _, c in messages) > MAX_PROMPT_CHARS:
                raise BadInputError(f"the conversation is longer than {MAX_PROMPT_CHARS} characters")
            text = self.tokenizer.apply_chat_template(messages)
            return self.tokenizer.tokenize(text, add_special=True, parse_special=True)
        raise BadInputError("a generate request needs a prompt or chat messages")

    def _run(self, sid, session, tokens, budget, sampling, stops, want_timings, is_active):
        route = session.route
        for hop in route:
            self._call(hop, "OpenSession", pb.OpenSessionRequest(
                session_id=sid, layers=wire.span(hop.layers), sampling=wire.sampling_to_pb(sampling)))
        yield pb.GenerateEvent(started=pb.GenerateEvent.Started(session_id=sid, prompt_tokens=len(tokens)))
        t0 = time.perf_counter()
        reply = None
        for i in range(0, len(tokens), self.n_batch):
            piece = tokens[i:i + self.n_batch]
            reply = self._step(route, sid, piece, i, sample=i + self.n_batch >= len(tokens))
        session.positions = len(tokens)
        stream = TextStream(stops)
        totals = pb.StepTimings()
        first = last = None
        finish = "length"
        while True:
            token = reply.token
            if self.tokenizer.is_eog(token):
                finish = "stop"
                break
            session.generated += 1
            text = stream.feed(self.tokenizer.piece(token))
            last = time.perf_counter()
            first = first or last
            yield pb.GenerateEvent(piece=pb.GenerateEvent.Piece(text=text, tokens=[token]))
            if stream.stopped:
                finish = "stop"
                break
            if session.generated >= budget:
                break
            if not is_active():
                finish = "cancelled"
                break
            reply = self._step(route, sid, [token], session.positions, sample=True)
            session.positions += 1
            if want_timings:
                _add_timings(totals, reply, time.perf_counter() - last)
        tail = stream.flush()
        if tail:
            yield pb.GenerateEvent(piece=pb.GenerateEvent.Piece(text=tail))
        n = session.generated
        if n >= 8 and last > first:
            with self._cond:
                if self._route == route:  # only sessions of the route the prediction is for
                    self._measured.append((n - 1) / (last - first))
        done = pb.GenerateEvent.Done(
            finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=n,
            first_token_ms=1e3 * ((first or time.perf_counter()) - t0),
            decode_tokens_per_s=(n - 1) / (last - first) if n > 1 and last > first else 0.0,
            decode_timings=totals,
        )
        yield pb.GenerateEvent(done=done)

    def _step(self, route, sid: str, tokens: list[int], start: int, sample: bool) -> pb.ForwardReply:
        first = route[0]
        request = pb.ForwardRequest(
            session_id=sid, start=start, n_positions=len(tokens), tokens=tokens, layers=_spans(route)[0],
            next=_spans(route)[1], sample=sample,
        )
        return self._call(first, "Forward", request)

    def _call(self, hop: RouteHop, method: str, request):
        if hop.is_self:
            name = {"Forward": "forward", "OpenSession": "open_session"}[method]
            try:
                return getattr(self.local, name)(request)
            except grpc.RpcError as e:  # the local node's call onward failed
                raise wire.from_rpc(e, "the next node") from None
        try:
            return getattr(self._stub(hop.address), method)(request, timeout=FORWARD_TIMEOUT_S)
        except grpc.RpcError as e:
            raise wire.from_rpc(e, f"node at {hop.address} (layers {hop.layers})") from None

    def _close_everywhere(self, sid: str, route) -> None:
        for hop in route:
            try:
                if hop.is_self:
                    self.local.close_session(sid)
                else:
                    self._stub(hop.address).CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=5.0)
            except (grpc.RpcError, SwarmError) as e:
                log.debug("closing session %s on %s: %s", sid, hop.address, e)

    # ------------------------------------------------------------ status

    def status(self) -> pb.StatusReply:
        now = time.monotonic()
        with self._cond:
            reply = pb.StatusReply(
                swarm=self.swarm, model_name=self.model_path.name, n_layer=self.n_layer, state=self._state,
                detail=self._detail, n_ctx=self.n_ctx, max_sessions=self.max_sessions,
            )
            for m in self._members.values():
                ns = reply.nodes.add(
                    node_id=m.node_id, name=m.name, address=m.address, resources=m.resources,
                    has_layers=m.layers is not None, pinned=m.pin is not None, state=m.state,
                    last_seen_s=0.0 if m.is_self else now - m.last_seen, is_coordinator=m.is_self, detail=m.detail,
                )
                if m.layers is not None:
                    ns.layers.CopyFrom(wire.span(m.layers))
                if m.compute is not None:
                    ns.profile.CopyFrom(pb.NodeProfile(
                        decode_ns_per_byte=1e9 * m.compute.decode_s_per_byte,
                        prefill_ns_per_byte=1e9 * m.compute.prefill_s_per_byte,
                        step_overhead_ms=1e3 * m.compute.step_overhead_s, rtt_ms=1e3 * m.rtt_s,
                        bandwidth_mbps=0.0 if m.bandwidth_bps == float("inf") else m.bandwidth_bps / 1e6,
                        reason=m.reason, cached=m.profile_cached))
            if self._prediction is not None and self._route is not None:
                reply.predicted_decode_tps = self._prediction.decode_tps
            if self._measured:
                reply.measured_decode_tps = statistics.median(self._measured)
                reply.measured_sessions = len(self._measured)
            for sid, s in self._sessions.items():
                reply.sessions.add(session_id=sid, positions=s.positions, generated=s.generated, age_s=now - s.started)
        return reply

    def close(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
            stubs, self._stubs = list(self._stubs.values()), {}
        for _, ch in stubs:
            ch.close()
        self.local.close()
        self.tokenizer.close()


@functools.lru_cache(maxsize=64)
def _spans(route: tuple[RouteHop, ...]) -> tuple[pb.LayerSpan, list[pb.Hop]]:
    """A route's wire form, built once per route rather than once per token."""
    return wire.span(route[0].layers), [pb.Hop(address=h.address, layers=wire.span(h.layers)) for h in route[1:]]


def _add_timings(totals: pb.StepTimings, reply: pb.ForwardReply, wall_s: float) -> None:
    """Split one step's wall time into compute, serialisation, sampling and the rest (network)."""
    hops = reply.timings
    totals.steps += 1
    compute = sum(h.compute_ms for h in hops)
    codec = sum(h.codec_ms for h in hops)
    sample = sum(h.sample_ms for h in hops)
    totals.compute_ms += compute
    totals.serialization_ms += codec
    totals.sampling_ms += sample
    totals.network_ms += max(0.0, 1e3 * wall_s - compute - codec - sample)


class CoordinatorService(pbg.CoordinatorServicer):
    """Thin gRPC front of a Coordinator."""

    def __init__(self, coordinator: Coordinator):
        self.c = coordinator

    @wire.served
    def Join(self, request, context):
        return self.c.join(request, _peer_host(context.peer()))

    @wire.served
    def Heartbeat(self, request, context):
        return self.c.heartbeat(request)

    @wire.served
    def Leave(self, request, context):
        self.c.leave(request.node_id)
        return pb.LeaveReply()

    @wire.served_stream
    def FetchShard(self, request, context):
        yield from self.c.fetch_chunks(request)

    @wire.served_stream
    def Generate(self, request, context):
        yield from self.c.generate(request, context.is_active)

    @wire.served
    def Status(self, request, context):
        return self.c.status()


def _peer_host(peer: str) -> str:
    """The IP a call came from ('ipv4:10.0.0.5:51234' -> '10.0.0.5')."""
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    if peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0]
    return "127.0.0.1"
