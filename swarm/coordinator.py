"""The coordinator: membership, placement, shard files, and the generation loop of every session.

It owns the model file and the tokenizer. It plans placement (a pure function in planner.py) whenever
the membership changes and no session is running, tells each node what to load, and drives each session
step by step. Hidden states flow node to node; only token ids come back here.

When a node of a running session fails, the session's step is stopped, a live node takes the lost range
(failover.py decides which), and the session's KV cache for that range is rebuilt there from the last
checkpoint plus the outputs the previous hop kept, before the step that failed runs again; a node that
leaves on purpose hands its sessions over between two steps (docs/fault-tolerance.md).
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import statistics
import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import grpc

from . import placement, planner, shardcache, wire
from .cache import file_digest
from ._proto import swarm_pb2 as pb
from ._proto import swarm_pb2_grpc as pbg
from .engine import Tokenizer, join_kv, kv_header
from .errors import BadInputError, KVStateError, NotReadyError, PeerError, ShardRangeError, SwarmError
from . import failover
from .failover import Recovery, replay_budget_from_env
from .gguf_file import read_gguf
from .layers import LayerRange
from .node import FORWARD_TIMEOUT_S, NodeService
from .sampling import SamplingParams
from .slicing import model_layer_count, slice_model
from .textstream import TextStream, check_stops
from .transfer import fault_chunks_from_env, iter_chunks
from .profiling import ComputeProfile, measure_link

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
LOST_AFTER_S = 2.5  # five missed heartbeats: a hung node is noticed within 3 s
PING_TIMEOUT_S = 0.5  # after a failed step: a live node answers a ping far sooner
MAX_RECOVERIES_PER_STEP = 3
LEAVE_TIMEOUT_S = 60.0  # how long a leaving node waits for its sessions to move
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
    extra: list[LayerRange] = field(default_factory=list)  # ranges taken over from failed nodes
    files: set[str] = field(default_factory=set)  # shard ids this node was given (it keeps them cached)
    steps: str = ""  # HOST:PORT of its step stream

    def hosted(self) -> list[LayerRange]:
        return ([self.layers] if self.layers is not None else []) + self.extra

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
    steps: str = ""  # where the hop takes pipeline steps (its step stream)


@dataclass(frozen=True)
class _Checkpoint:
    """A hop's KV state at `positions`: a full state, or what changed since `parent` (a delta)."""

    positions: int
    lineage: str = ""
    blob: bytes = b""
    parent: "_Checkpoint | None" = None
    links: int = 0  # deltas between this one and its full state

    def state(self) -> bytes:
        """The full state, put together from the chain (checksums verified); b'' for no checkpoint."""
        chain, c = [], self
        while c is not None:
            chain.append(c.blob)
            c = c.parent
        return join_kv(chain[::-1]) if self.blob else b""


_NO_CHECKPOINT = _Checkpoint(0)
# Longer chains are put together into one full state when the next delta comes (bounds the work of a
# recovery and what a chain holds that is no longer needed).
_MAX_LINKS = 32


@dataclass
class _Session:
    route: tuple[RouteHop, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    started: float = field(default_factory=time.monotonic)
    positions: int = 0
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # every position fed so far (prompt, then each token)
    prompt_len: int = 0
    # Recovery state: the newest KV checkpoints of each hop, and per hop the compute since its last one,
    # in seconds; hops to ask for one with the next step.
    checkpoints: dict[LayerRange, list[_Checkpoint]] = field(default_factory=dict)
    since: dict[LayerRange, float] = field(default_factory=dict)
    pending: set[LayerRange] = field(default_factory=set)
    inflight: object = None  # the step's future while it waits on a remote first hop
    interrupted: str = ""  # why the heartbeat watcher stopped the step in flight
    epoch: int = 0  # raised by every recovery; nodes refuse steps of older attempts

    def checkpoint(self, layers: LayerRange, upto: int) -> _Checkpoint:
        """The newest checkpoint of `layers` at `upto` positions or fewer (an empty one if none)."""
        return max((c for c in self.checkpoints.get(layers, ()) if c.positions <= upto), default=_NO_CHECKPOINT,
                   key=lambda c: c.positions)

    def kept_from(self, layers: LayerRange) -> int:
        """Where the previous hop may let go of what it kept: the newest checkpoint of a step that completed
        (one taken by a step that then failed further on must not count)."""
        return self.checkpoint(layers, self.positions).positions

    def checkpoint_bytes(self) -> int:
        """What this session's checkpoints take, each piece of a chain counted once."""
        seen: dict[int, int] = {}
        for cs in self.checkpoints.values():
            for c in cs:
                while c is not None and id(c) not in seen:
                    seen[id(c)] = len(c.blob)
                    c = c.parent
        return sum(seen.values())


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
        failover: bool = True,
        step_address: str = "",
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
        me = Member("n0", name, address, resources, pin, is_self=True, steps=step_address)
        self._members: dict[str, Member] = {me.node_id: me}
        self._route: tuple[RouteHop, ...] | None = None
        self._state, self._detail = "planning", "planning placement"
        self._dirty = True
        self._files: dict[str, Path] = {}
        self._held: dict[str, shardcache.Hold] = {}  # the files in _files: offered, so never evicted
        self._shard_ids: dict[LayerRange, str] = {}  # the shard file cut for each range
        self._sessions: dict[str, _Session] = {}
        self._slots = threading.Semaphore(max_sessions)
        self._waiting = 0
        self._stubs: dict[str, tuple[pbg.NodeStub, grpc.Channel]] = {}
        self._faults = fault_chunks_from_env()
        self._links: dict[tuple[str, str], tuple[float, float]] = {}
        self._prediction: planner.Prediction | None = None
        self._measured: collections.deque[float] = collections.deque(maxlen=20)
        self._checkpoint_counts = pb.CheckpointCounts()
        self.replay_budget_s = replay_budget_from_env()
        self._takeover = threading.Lock()  # one decision at a time about who takes a lost range
        self._replacements: dict[tuple[str, LayerRange], RouteHop] = {}  # (lost node, range) -> successor
        self._leaving: dict[str, dict[LayerRange, RouteHop]] = {}  # node leaving gracefully -> successors
        self._recoveries: collections.deque[Recovery] = collections.deque(maxlen=50)
        self._recovery_of: dict[str, Recovery] = {}  # node id -> the record of its loss
        self._losses: dict[str, list[float]] = {}  # address -> when it was lost (flapping back-off)
        self.reprofile = reprofile
        # Off: nodes keep no outputs and hand in no checkpoints; a failed node ends its sessions.
        self.failover_enabled = failover
        self.recompute_only = False  # benchmarks: rebuild from the tokens even when kept states would do
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
        if not 0 < request.step_port < 65536:
            raise BadInputError(f"step port {request.step_port} is not a TCP port (a node older than this coordinator "
                                "sends none: upgrade it)")
        host = request.host or peer_host
        address = wire.check_address(f"{host}:{request.port}")
        step_address = wire.check_address(f"{host}:{request.step_port}")
        pin = wire.layer_range(request.pin) if request.has_pin else None
        if pin is not None:
            pin.check_within(self.n_layer)
        if pin is not None:
            # A node restarted under the same pin may find its old self not yet declared lost: if that
            # one does not answer, the newcomer replaces it.
            with self._cond:
                rivals = [m for m in self._members.values() if not m.is_self and m.address != address
                          and m.pin is not None and pin.start < m.pin.end and m.pin.start < pin.end]
            for m in rivals:
                if self._unreachable((RouteHop(m.node_id, m.address, m.pin, False),)):
                    with self._cond:
                        if self._members.pop(m.node_id, None) is not None:
                            self._on_member_gone(m, f"does not answer; {name} at {address} takes its pin {m.pin}",
                                                 "did not answer when a node with its pin joined")
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
            member = Member(f"n{next(self._ids)}", name, address, request.resources, pin, steps=step_address)
            wait = failover.backoff_s(self._losses.get(address, []), time.monotonic())
            if wait:  # it keeps dropping out: plan without it for a while, longer each time
                member.excluded_until = time.monotonic() + wait
                member.state, member.detail = "backoff", f"lost {len(self._losses[address])} times; planned for again in {wait:.0f} s"
                log.warning("node %s at %s keeps dropping out; leaving it out of plans for %.0f s", name, address, wait)
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

    def leave(self, node_id: str, graceful: bool = False) -> pb.LeaveReply:
        """A node leaves. Gracefully: its sessions move to successors between two steps, then it goes."""
        with self._cond:
            m = self._members.get(node_id)
            if m is None or m.is_self:
                return pb.LeaveReply()
            used = self._ranges_in_use(node_id)
            if not (graceful and used):
                del self._members[node_id]
                self._on_member_gone(m, "left")
                return pb.LeaveReply()
            m.state, m.detail = "leaving", "handing its sessions over"
        record = Recovery(m.name, m.address, tuple(used), "left")
        try:
            with self._takeover:  # one decision at a time: two could pick the same node's memory
                successors = {r: self._take_over(m, r) for r in used}
        except SwarmError as e:
            log.warning("node %s leaves, but %s; its sessions will be rebuilt", m.name, e)
            with self._cond:
                if self._members.pop(node_id, None) is not None:
                    self._on_member_gone(m, "left")
            return pb.LeaveReply(detail=str(e))
        record.successor = ", ".join(sorted({h.node_id for h in successors.values()}))
        record.detail = f"successor loaded in {1e3 * (time.monotonic() - record.at):.0f} ms while the sessions went on"
        with self._cond:
            self._recoveries.append(record)
            self._recovery_of[node_id] = record
            self._leaving[node_id] = successors
            self._route = self._patched(self._route)
            deadline = time.monotonic() + LEAVE_TIMEOUT_S
            while any(h.node_id == node_id for s in self._sessions.values() for h in s.route):
                if time.monotonic() > deadline:
                    record.detail = f"sessions did not reach a step boundary in {LEAVE_TIMEOUT_S:.0f} s"
                    break
                self._cond.wait(0.1)
            self._leaving.pop(node_id, None)
            if self._members.pop(node_id, None) is not None:
                self._on_member_gone(m, "left")
        if not record.sessions:
            record.path = failover.NONE
        log.info("node %s left; %d session(s) moved to %s", m.name, record.sessions, record.successor)
        return pb.LeaveReply(migrated_sessions=record.sessions, detail=record.detail)

    def _ranges_in_use(self, node_id: str) -> list[LayerRange]:
        """Ranges the node serves on the current route or a running session's route. Lock held."""
        return sorted({h.layers for s in self._sessions.values() for h in s.route if h.node_id == node_id},
                      key=lambda r: r.start)

    def _on_member_gone(self, m: Member, why: str, detection: str = "") -> None:
        """Call with the lock held, after removing `m` from the members."""
        self._forget_stub(m.address, m.steps)
        log.log(logging.INFO if why in ("left", "restarted") else logging.WARNING, "node %s (%s) %s%s", m.name,
                m.address, why, f"; it held layers {', '.join(map(str, m.hosted()))}" if m.hosted() else "")
        if why != "left":
            self._losses.setdefault(m.address, []).append(time.monotonic())
        in_use = [s for s in self._sessions.values() if any(h.node_id == m.node_id for h in s.route)]
        if m.hosted() and m.node_id not in self._recovery_of:
            record = Recovery(m.name, m.address, tuple(m.hosted()), detection or why)
            if not in_use:
                record.detail = "no session was running; layers re-planned"
            self._recoveries.append(record)
            self._recovery_of[m.node_id] = record
        if in_use:
            # Running sessions carry on: each one stops its step and rebuilds the lost range elsewhere.
            for s in in_use:
                s.interrupted = f"node {m.name} ({m.address}) {why}"
                self._interrupt(s)
        elif m.hosted() and self._route is not None and any(h.node_id == m.node_id for h in self._route):
            self._route = None
            self._state, self._detail = "planning", f"node {m.name} {why}; re-planning layers {m.layers}"
        self._dirty = True
        self._cond.notify_all()

    def _interrupt(self, session: _Session) -> None:
        """Stop waiting for a session's step in flight (a node on its route is gone)."""
        if session.inflight is not None:
            session.inflight.cancel()
        elif session.route and session.route[0].is_self:
            for sid, s in list(self._sessions.items()):
                if s is session:
                    self.local.cancel(sid)

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
                        silent = now - m.last_seen
                        self._on_member_gone(m, f"missed its heartbeats for {silent:.1f} s",
                                             f"missed heartbeats for {silent:.1f} s")
                for s in self._sessions.values():
                    if s.interrupted:  # a cancel can race with the step's start: repeat it until seen
                        self._interrupt(s)

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
        held = shardcache.hold(shard.path)  # nodes fetch it from here: not evicted while this coordinator runs
        spec = pb.ShardSpec(
            shard_id=shard.shard_id, file_name=shard.path.name, size=shard.path.stat().st_size,
            sha256=file_digest(shard.path), layers=wire.span(layers), n_layer_total=self.n_layer,
        )
        with self._cond:
            self._files[spec.shard_id] = shard.path
            self._held[spec.shard_id] = held  # an earlier hold of the same file is released as it is dropped
            self._shard_ids[layers] = spec.shard_id
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
                    m.extra = []
                    if m.layers is not None:
                        m.files.add(jobs[node_id].shard.shard_id)
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
            RouteHop(a.node_id, m.address, a.layers, m.is_self, m.steps)
            for a in plan.assignments for m in (by_id[a.node_id],)
        )
        prediction = self._measure_route(route, plan, members)
        with self._cond:
            self._prediction = prediction
            self._measured.clear()
            if self._dirty:
                return  # the membership changed while loading; the next plan supersedes this one
            self._replacements.clear()
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

    def _forget_stub(self, address: str, steps: str = "") -> None:
        if steps:
            self.local.links.forget(steps)
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
        if sampling.seed is None and not sampling.greedy:
            # Fixed here, so that a sampler rebuilt on another node after a failure draws the same tokens.
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
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
        session = None
        try:
            with self._cond:  # the planner sees the session as soon as the route is taken
                route = self.wait_ready(max(0.0, deadline - time.monotonic()), is_active)
                session = self._sessions[sid] = _Session(route, sampling)
            yield from self._run(sid, session, tokens, budget, stops, request.timings, is_active)
        finally:
            if session is not None:
                self._close_everywhere(sid, session.route)
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

    def _run(self, sid, session: _Session, tokens, budget, stops, want_timings, is_active):
        # A node lost just before the session started is carried over like one lost during a step.
        self._advance(sid, session, [], 0, sample=False)
        yield pb.GenerateEvent(started=pb.GenerateEvent.Started(session_id=sid, prompt_tokens=len(tokens)))
        t0 = time.perf_counter()
        reply = None
        session.prompt_len = len(tokens)
        for i in range(0, len(tokens), self.n_batch):
            piece = tokens[i:i + self.n_batch]
            last_piece = i + self.n_batch >= len(tokens)
            if last_piece and self.failover_enabled:
                # Every remote hop checkpoints with the prompt's last piece: the prompt is the costliest part
                # to replay, and its checkpoint (the session's largest) is taken before the first token.
                session.pending |= {h.layers for h in session.route if not h.is_self}
            reply = self._advance(sid, session, piece, i, sample=last_piece)
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
            event = pb.GenerateEvent(piece=pb.GenerateEvent.Piece(text=text, tokens=[token]))
            if stream.stopped or session.generated >= budget or not is_active():
                finish = "stop" if stream.stopped else "length" if session.generated >= budget else "cancelled"
                yield event
                break
            if len(session.route) == 1 and session.route[0].is_self:  # nothing runs elsewhere meanwhile
                yield event
                reply = self._advance(sid, session, [token], session.positions, sample=True)
            else:  # the next step goes first: the client's stream sends this piece while other nodes compute
                reply = yield from self._advance_sending(sid, session, [token], session.positions, True, event)
            if want_timings:
                _add_timings(totals, reply, time.perf_counter() - last)
        tail = stream.flush()
        if tail:
            yield pb.GenerateEvent(piece=pb.GenerateEvent.Piece(text=tail))
        n = session.generated
        if n >= 8 and last > first:
            with self._cond:
                if self._route == session.route:  # only sessions of the route the prediction is for
                    self._measured.append((n - 1) / (last - first))
        done = pb.GenerateEvent.Done(
            finish_reason=finish, prompt_tokens=len(tokens), completion_tokens=n,
            first_token_ms=1e3 * ((first or time.perf_counter()) - t0),
            decode_tokens_per_s=(n - 1) / (last - first) if n > 1 and last > first else 0.0,
            decode_timings=totals,
        )
        yield pb.GenerateEvent(done=done)

    # ------------------------------------------------------------ one step, and surviving failures

    def _advance(self, sid: str, session: _Session, tokens: list[int], start: int, sample: bool) -> pb.ForwardReply:
        """Run one step of a session; when a node fails, carry the session over to a successor and retry."""
        steps = self._advance_sending(sid, session, tokens, start, sample, None)
        try:
            next(steps)
        except StopIteration as done:
            return done.value
        raise AssertionError("a step without an event to send yielded")

    def _advance_sending(self, sid: str, session: _Session, tokens: list[int], start: int, sample: bool,
                         event: pb.GenerateEvent | None):
        """`_advance` as a generator that also yields `event` once, while the step is on its way through the
        remote hops (the client's stream sends it meanwhile), or before a recovery or an error; returns the
        step's reply."""
        recovered: list[tuple[list[Recovery], str, int, float]] = []
        failed, attempts = "", 0
        try:
            while True:
                try:
                    if failed:
                        recovered.append(self._recover(sid, session, start, failed))
                        failed = ""
                    if self._leaving:
                        self._migrate(sid, session)
                    if not tokens:  # the session's start: open it on every hop
                        for hop in session.route:
                            self._open(sid, session, hop, history=())
                        reply = pb.ForwardReply()
                        break
                    pending = self._start_forward(sid, session, tokens, start, sample)
                    if event is not None:
                        try:
                            yield event
                        except GeneratorExit:  # the client went away while the step ran: stop it
                            pending.cancel()
                            with contextlib.suppress(Exception):
                                pending.result()
                            raise
                        event = None
                    reply = pending.result()
                    break
                except PeerError as e:
                    if event is not None:  # the client has the last token before a recovery or an error
                        yield event
                        event = None
                    attempts += 1
                    if not self.failover_enabled:
                        raise
                    if attempts > MAX_RECOVERIES_PER_STEP:
                        raise PeerError(f"{e}; gave up after {attempts - 1} recoveries at one step") from None
                    failed = str(e)
        except Exception:
            if event is not None:
                yield event
            raise
        if event is not None:
            yield event
        session.tokens.extend(tokens)
        session.positions = start + len(tokens)
        self._note_compute(session, reply)
        with self._cond:
            for records, path, replayed, detected in recovered:
                for record in records:
                    record.add_session(path, time.monotonic() - detected, replayed)
        return reply

    def _request(self, sid: str, session: _Session, tokens: list[int], start: int, sample: bool) -> pb.ForwardRequest:
        """The step's message: the route, which hops checkpoint, and what each keeps for the next hop."""
        route = session.route
        flags = [h.layers in session.pending for h in route]
        # What each hop keeps for the next: from that one's newest checkpoint; nothing for the coordinator's
        # own hop (it never needs rebuilding) or with failover off.
        keep = [session.kept_from(route[i + 1].layers)
                if i + 1 < len(route) and self.failover_enabled and not route[i + 1].is_self else _KEEP_NOTHING
                for i in range(len(route))]
        hops = [pb.Hop(address=h.address, layers=_span(h.layers), checkpoint=f, keep_from=k, step_address=h.steps)
                for h, f, k in zip(route[1:], flags[1:], keep[1:])]
        return pb.ForwardRequest(
            session_id=sid, start=start, n_positions=len(tokens), tokens=tokens, layers=_span(route[0].layers),
            next=hops, sample=sample, checkpoint=flags[0], keep_from=keep[0], epoch=session.epoch,
        )

    def _forward(self, sid: str, session: _Session, tokens: list[int], start: int, sample: bool) -> pb.ForwardReply:
        return self._start_forward(sid, session, tokens, start, sample).result()

    def _start_forward(self, sid: str, session: _Session, tokens: list[int], start: int, sample: bool) -> "_Step":
        """Send one step along the session's route (the coordinator's own hop runs it first); the step's
        `result()` raises PeerError when a node fails or the watcher stops it."""
        request = self._request(sid, session, tokens, start, sample)
        first = session.route[0]
        if first.is_self:
            try:
                return _Step(self.local.start_forward(request), "the next node")
            except grpc.RpcError as e:  # the local node's call onward failed
                raise wire.from_rpc(e, "the next node") from None
        where = f"node at {first.address} (layers {first.layers})"
        try:
            call = self.local.links.call(first.steps, request, timeout=FORWARD_TIMEOUT_S)
        except grpc.RpcError as e:
            raise wire.from_rpc(e, where) from None
        with self._cond:
            session.inflight = call
        return _Step(call, where, session, self._cond)

    def _note_compute(self, session: _Session, reply: pb.ForwardReply) -> None:
        """Count each hop's compute since its last checkpoint; ask for one when a rebuild would cost too much."""
        asked, session.pending = session.pending, set()
        for timing in reply.timings:
            layers = wire.layer_range(timing.layers)
            # A hop asked for a checkpoint exported it after this step's compute: nothing to replay since.
            session.since[layers] = 0.0 if layers in asked else session.since.get(layers, 0.0) + timing.compute_ms / 1e3
        for hop in session.route:
            if (self.failover_enabled and not hop.is_self
                    and failover.should_checkpoint(session.since.get(hop.layers, 0.0), self.replay_budget_s)):
                session.pending.add(hop.layers)

    def store_checkpoint(self, pieces: Iterable[pb.Checkpoint]) -> bool:
        """Keep a hop's KV checkpoint (in pieces, as wire.kv_pieces makes them) with its session: the newest
        of a completed step, and any newer one; freed when the session ends. A delta is kept on top of the
        checkpoint it was taken against; False when that one is gone (the node sends a full state next)."""
        checkpoint, blob = wire.join_kv_pieces(pieces)
        layers = wire.layer_range(checkpoint.layers)
        positions = int(checkpoint.positions)
        with self._cond:
            session = self._sessions.get(checkpoint.session_id)
            if session is None or all(h.layers != layers for h in session.route):
                return True  # the session ended or moved on
            shard_id = self._shard_ids.get(layers)
            limit = session.positions + self.n_batch
        # Checked before it counts: a wrong one would let the previous hop drop what a rebuild needs.
        # (A full state's checksum is verified when it is used; a delta is small, so it is checked now.)
        head = kv_header(blob)
        delta = "base" in head
        if delta:
            head = kv_header(blob, verify=True)
        if head["n_past"] != positions or head["shard_id"] != shard_id or positions > limit or (
                delta and not 0 <= head["base"] <= positions):
            raise BadInputError(f"checkpoint of layers {layers} does not match session {checkpoint.session_id!r}")
        with self._cond:
            held = session.checkpoints.get(layers, [])
            parent = None
            if delta:
                parent = next((c for c in held if c.positions == head["base"] and c.lineage == head["lineage"]), None)
                if parent is None:
                    self._checkpoint_counts.refused += 1
                    session.pending.add(layers)  # the whole state comes with the next step
                    return False
                self._checkpoint_counts.deltas += 1
                self._checkpoint_counts.delta_bytes += len(blob)
            else:
                self._checkpoint_counts.full += 1
                self._checkpoint_counts.full_bytes += len(blob)
            new = _Checkpoint(positions, head["lineage"], blob, parent, parent.links + 1 if parent else 0)
        if new.links > _MAX_LINKS:  # put the chain together, outside the lock
            full = new.state()
            new = _Checkpoint(positions, kv_header(full)["lineage"], full)
        with self._cond:
            confirmed = session.kept_from(layers)
            # The newest checkpoint of a completed step, and any newer one of a step still under way.
            session.checkpoints[layers] = sorted(
                [c for c in session.checkpoints.get(layers, [])
                 if c.positions >= confirmed and c.positions != positions]
                + [new], key=lambda c: c.positions)[-3:]
        return True

    def _recover(self, sid: str, session: _Session, start: int, error: str):
        """Carry a session whose step at `start` failed over to live nodes; (records, path, replayed, detected)."""
        detected = time.monotonic()
        with self._cond:
            session.interrupted = ""
            session.epoch += 1  # steps of the attempt that failed are refused from now on
            dead = [h for h in session.route if not h.is_self and h.node_id not in self._members]
        if not dead:
            dead = self._unreachable(session.route)
            with self._cond:
                for h in dead:
                    m = self._members.pop(h.node_id, None)
                    if m is not None:
                        self._on_member_gone(m, f"failed during a step ({error})", "call failed")
        if not dead:  # nobody is down: a passing network error; undo the step everywhere and try again
            log.warning("session %s: step %d failed but every node answers (%s); retrying", sid, start, error)
            path, replayed = self._rebuild(sid, session, start, {})
            return [], path, replayed, detected
        replaced = {}
        for i, hop in enumerate(session.route):
            if hop in dead:
                replaced[i] = self._successor(hop, session.route)
        ready = time.monotonic()
        route = tuple(replaced.get(i, h) for i, h in enumerate(session.route))
        with self._cond:
            session.route = route
            self._route = self._patched(self._route)
            if all(h.is_self or h.node_id in self._members for h in route):
                session.interrupted = ""  # set for this session by the loss it is getting over now
        path, replayed = self._rebuild(sid, session, start, replaced)
        rebuilt = time.monotonic()
        records = []
        with self._cond:
            for i, new in replaced.items():
                record = self._recovery_of.get(dead[[h.layers for h in dead].index(new.layers)].node_id)
                if record is not None and record not in records:
                    record.successor = record.successor or new.node_id
                    record.detail = record.detail or (f"successor ready after {1e3 * (ready - detected):.0f} ms, "
                                                      f"rebuilt in {1e3 * (rebuilt - ready):.0f} ms")
                    records.append(record)
        log.info("session %s carried over at position %d by %s (%d positions replayed)", sid, start, path, replayed)
        return records, path, replayed, detected

    def _unreachable(self, route: tuple[RouteHop, ...]) -> list[RouteHop]:
        """The remote hops of `route` that are down: a ping is refused, or times out twice
        (PING_TIMEOUT_S) from a node whose heartbeats have also stopped (a busy node still heartbeats)."""
        remote = [h for h in route if not h.is_self]

        def down(h: RouteHop) -> bool:
            for _ in range(2):
                try:
                    self._stub(h.address).Ping(pb.PingRequest(), timeout=PING_TIMEOUT_S)
                    return False
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.UNAVAILABLE:
                        return True  # nothing listens there any more
            with self._cond:
                m = self._members.get(h.node_id)
                return m is None or time.monotonic() - m.last_seen > 2 * HEARTBEAT_S

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            return [h for h, d in zip(remote, pool.map(down, remote)) if d]

    def _successor(self, lost: RouteHop, route: tuple[RouteHop, ...]) -> RouteHop:
        """The hop that replaces `lost` (decided once per lost node and range; later sessions reuse it)."""
        with self._takeover:
            done = self._replacements.get((lost.node_id, lost.layers)) or self._leaving.get(
                lost.node_id, {}).get(lost.layers)  # a node that died while handing over: its successor is ready
            with self._cond:
                if done is not None and done.node_id in self._members:
                    return done
                m = self._members.get(lost.node_id) or Member(lost.node_id, lost.node_id, lost.address,
                                                               pb.NodeResources(), None)
            hop = self._take_over(m, lost.layers, route)
            self._replacements[(lost.node_id, lost.layers)] = hop
            return hop

    def _take_over(self, gone: Member, layers: LayerRange, route: tuple[RouteHop, ...] = ()) -> RouteHop:
        """Load `layers` on the best live node beside what it holds; raises PeerError when none can."""
        need = self.footprint.shard_bytes(layers, self.n_ctx, self.max_sessions, self.n_batch)
        spec = self._shard_spec(layers)
        tried: set[str] = {gone.node_id}
        while True:
            with self._cond:
                now = time.monotonic()
                on_route = {h.node_id for h in route or self._route or ()}
                pool = {m.node_id: m for m in self._members.values()
                        if m.node_id not in tried and m.node_id not in self._leaving and m.excluded_until <= now
                        and m.state not in ("failed", "leaving") and (m.is_self or m.compute is not None)}
                candidates = [failover.Candidate(
                    node_id=m.node_id, name=m.name,
                    free_bytes=m.usable_memory() - sum(
                        self.footprint.shard_bytes(r, self.n_ctx, self.max_sessions, self.n_batch) for r in m.hosted()),
                    has_file=m.is_self or spec.shard_id in m.files,
                    step_s=(m.compute.step_overhead_s + m.compute.decode_s_per_byte * need) if m.compute else 0.0,
                    serves_route=m.node_id in on_route,
                ) for m in pool.values()]
            choice = failover.choose_successor(need, candidates)
            if choice is None:
                raise PeerError(
                    f"node {gone.name} ({gone.address}) is gone and no live node has {need >> 20} MB free for its "
                    f"layers {layers}; add a node (swarm join) or give one more --max-memory"
                )
            m = pool[choice.node_id]
            try:
                self._assign(m, pb.AssignRequest(has_shard=True, extra=True, shard=spec, n_ctx=self.n_ctx,
                                                 max_sessions=self.max_sessions, n_batch=self.n_batch))
            except SwarmError as e:
                log.warning("node %s could not take layers %s: %s", m.name, layers, e)
                tried.add(m.node_id)
                continue
            with self._cond:
                if layers not in m.hosted():
                    m.extra.append(layers)
                m.files.add(spec.shard_id)
                m.state = "ready"
            log.info("node %s takes layers %s over from %s", m.name, layers, gone.name)
            return RouteHop(m.node_id, m.address, layers, m.is_self, m.steps)

    def _patched(self, route: tuple[RouteHop, ...] | None) -> tuple[RouteHop, ...] | None:
        """`route` with every lost or leaving hop replaced by its successor. Lock held."""
        if route is None:
            return None
        out = []
        for h in route:
            h = self._replacements.get((h.node_id, h.layers), h)
            h = self._leaving.get(h.node_id, {}).get(h.layers, h)
            out.append(h)
        return tuple(out)

    def _rewind(self, sid: str, session: _Session, length: int, skip) -> None:
        for i, hop in enumerate(session.route):
            if i not in skip:
                self._call(hop, "Rewind", pb.RewindRequest(session_id=sid, layers=_span(hop.layers), length=length,
                                                           epoch=session.epoch))

    def _rebuild(self, sid: str, session: _Session, start: int, replaced: dict[int, RouteHop]) -> tuple[str, int]:
        """Bring the replaced hops of a session to `start` positions; ('replay' or 'recompute', positions run)."""
        route = session.route
        try:
            if self.recompute_only:
                raise KVStateError("rebuilding from kept states is switched off")
            self._rewind(sid, session, start, skip=replaced)
            with self._cond:
                base = {i: session.checkpoint(route[i].layers, start) for i in replaced}
            replayed = 0
            for i in sorted(replaced):
                hop, at, blob = route[i], base[i].positions, base[i].state()
                nxt = route[i + 1].layers if i + 1 < len(route) else None
                # What the new hop keeps for the next one: from that one's checkpoint (or rebuild point) on.
                keep = base[i + 1].positions if i + 1 in replaced else (session.kept_from(nxt) if nxt else 0)
                self._open(sid, session, hop, history=session.tokens[:at])
                self._call(hop, "ImportKV", wire.kv_pieces(pb.ImportKVRequest(
                    session_id=sid, layers=_span(hop.layers), keep_from=keep, epoch=session.epoch), blob))
                if i == 0:
                    for b_start, b_tokens in self._batches(session, at, start):
                        self._call(hop, "Forward", pb.ForwardRequest(
                            session_id=sid, start=b_start, n_positions=len(b_tokens), tokens=b_tokens,
                            layers=_span(hop.layers), replay=True, keep_from=keep, epoch=session.epoch))
                else:
                    up = route[i - 1]
                    self._call(up, "Resend", pb.ResendRequest(
                        session_id=sid, layers=_span(up.layers), from_position=at, to_position=start,
                        to=pb.Hop(address=hop.address, layers=_span(hop.layers), keep_from=keep), epoch=session.epoch))
                replayed += start - at
            path = failover.REPLAY
        except (KVStateError, BadInputError) as e:
            # What was kept does not reach back far enough: run the session's tokens through again.
            log.warning("session %s: rebuilding from kept states failed (%s); recomputing from its tokens", sid, e)
            with self._cond:
                session.checkpoints.clear()
                session.since.clear()
                session.pending.clear()  # no checkpoints while the tokens run through again
            for hop in route:
                self._open(sid, session, hop, history=())
            for b_start, b_tokens in self._batches(session, 0, start):
                self._forward(sid, session, b_tokens, b_start, sample=False)
            path, replayed = failover.RECOMPUTE, start
        # Checkpoint every remote hop with the next step, so what each keeps is consistent again.
        session.pending = {h.layers for h in route if not h.is_self}
        return path, replayed

    def _batches(self, session: _Session, frm: int, to: int) -> list[tuple[int, list[int]]]:
        """The session's positions frm..to-1 as they were first run: prompt pieces of n_batch, then one by one."""
        out, p = [], frm
        while p < to:
            if p < session.prompt_len:
                if p % self.n_batch:
                    raise KVStateError(f"position {p} is inside a prompt batch; cannot replay from there")
                end = min(p + self.n_batch, session.prompt_len)
                if end > to:
                    raise KVStateError(f"positions {p}:{end} were one batch; cannot replay a part of it")
            else:
                end = p + 1
            out.append((p, session.tokens[p:end]))
            p = end
        return out

    def _open(self, sid: str, session: _Session, hop: RouteHop, history) -> None:
        keep = max(256, session.sampling.repeat_last_n)
        self._call(hop, "OpenSession", pb.OpenSessionRequest(
            session_id=sid, layers=_span(hop.layers), sampling=wire.sampling_to_pb(session.sampling),
            history=list(history)[-keep:], epoch=session.epoch))

    def _migrate(self, sid: str, session: _Session) -> None:
        """Between two steps: hand the session's state on every leaving hop over to its successor."""
        with self._cond:
            moves = [(i, h, self._leaving[h.node_id][h.layers]) for i, h in enumerate(session.route)
                     if h.node_id in self._leaving and h.layers in self._leaving[h.node_id]]
        for i, old, new in moves:
            t0 = time.monotonic()
            path, replayed = failover.MIGRATE, 0
            try:
                self._open(sid, session, new, history=session.tokens)
                self._call(old, "Handoff", pb.HandoffRequest(
                    session_id=sid, layers=_span(old.layers), to=pb.Hop(address=new.address, layers=_span(new.layers)),
                    epoch=session.epoch))
                with self._cond:
                    session.route = session.route[:i] + (new,) + session.route[i + 1:]
            except SwarmError as e:  # the handover failed: rebuild the range on the successor instead
                log.warning("session %s: handing layers %s over failed (%s); rebuilding them", sid, old.layers, e)
                with self._cond:
                    session.route = session.route[:i] + (new,) + session.route[i + 1:]
                path, replayed = self._rebuild(sid, session, session.positions, {i: new})
            with self._cond:
                record = self._recovery_of.get(old.node_id)
                if record is not None:
                    record.add_session(path, time.monotonic() - t0, replayed)
                self._cond.notify_all()

    def _call(self, hop: RouteHop, method: str, request):
        if hop.is_self:
            try:
                return getattr(self.local, _LOCAL[method])(request)
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
                    node_id=m.node_id, name=m.name, address=m.address, step_address=m.steps, resources=m.resources,
                    has_layers=m.layers is not None, pinned=m.pin is not None, state=m.state,
                    last_seen_s=0.0 if m.is_self else now - m.last_seen, is_coordinator=m.is_self, detail=m.detail,
                )
                if m.layers is not None:
                    ns.layers.CopyFrom(wire.span(m.layers))
                ns.extra_layers.extend(wire.span(r) for r in m.extra)
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
            reply.checkpoints.CopyFrom(self._checkpoint_counts)
            for sid, s in self._sessions.items():
                reply.sessions.add(session_id=sid, positions=s.positions, generated=s.generated, age_s=now - s.started,
                                   checkpoint_bytes=s.checkpoint_bytes())
            for r in self._recoveries:
                rec = reply.recoveries.add(
                    at_unix=r.at_unix, node=r.node, address=r.address, detection=r.detection, path=r.path,
                    sessions=r.sessions, stall_ms=1e3 * r.stall_s, successor=", ".join(
                        self._members[i].name if i in self._members else i for i in r.successor.split(", ") if i),
                    replayed_positions=r.replayed_positions, detail=r.detail)
                if r.layers:
                    rec.layers.CopyFrom(wire.span(r.layers[0]))
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
        for held in self._held.values():
            held.release()


_KEEP_NOTHING = (1 << 32) - 1  # keep_from beyond any position: a node keeps no outputs
_LOCAL = {"Forward": "forward", "OpenSession": "open_session", "Rewind": "rewind", "ImportKV": "import_kv",
          "Resend": "resend", "Handoff": "handoff"}


@functools.lru_cache(maxsize=256)
def _span(layers: LayerRange) -> pb.LayerSpan:
    """A range's wire form, built once rather than once per token (treat as read-only)."""
    return wire.span(layers)


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


class _Step:
    """One step on its way: the first hop's call (the local node's `Onward` or a step-stream call)."""

    def __init__(self, call, where: str, session: "_Session | None" = None, cond: threading.Condition | None = None):
        self._call, self._where, self._session, self._cond = call, where, session, cond

    def cancel(self) -> None:
        self._call.cancel()

    def result(self) -> pb.ForwardReply:
        session = self._session
        try:
            return self._call.result()
        except grpc.FutureCancelledError:
            raise PeerError(f"step stopped: {(session.interrupted if session else '') or 'cancelled'}") from None
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.CANCELLED and session is not None:
                raise PeerError(f"step stopped: {session.interrupted or 'cancelled'}") from None
            raise wire.from_rpc(e, self._where) from None
        finally:
            if session is not None:
                with self._cond:
                    session.inflight = None


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
        return self.c.leave(request.node_id, request.graceful)

    @wire.served
    def StoreCheckpoint(self, request_iterator, context):
        return pb.CheckpointReply(need_full=not self.c.store_checkpoint(request_iterator))

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
