"""A node's service: hold a shard, run its layers for each step, pass hidden states to the next hop.

The final shard samples; the token travels back along the chain of calls to whoever started the step.
A node keeps the outputs it sent onward and checkpoints its KV state when asked, so that the next
node can be rebuilt elsewhere if it fails, and can hand a session over when it leaves.
A node checks every request before llama.cpp sees it and keeps serving after a bad one.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import grpc

from . import cache, shardcache, steps, wire
from ._proto import swarm_pb2 as pb
from ._proto import swarm_pb2_grpc as pbg
from .engine import KVBase, Shard
from .errors import BadInputError, NotReadyError, PeerError, SwarmError
from .kept import KeptStep, OutputLog
from .layers import LayerRange
from .sampling import Sampler
from .slicing import shard_info
from .transfer import fetch_shard

log = logging.getLogger(__name__)

FORWARD_TIMEOUT_S = 120.0  # one step of a big prompt on a slow machine; a dead peer fails far sooner
_MAX_N_CTX = 1 << 20
_MAX_SESSIONS = 256
# A session nobody has stepped for this long was abandoned (its coordinator crashed or lost the
# network before closing it); its KV sequence is freed when a new session needs room.
SESSION_IDLE_S = 600.0
_MAX_PING = 16 << 20
_MAX_PENDING_CHECKPOINTS = 8


@dataclass
class LoadedShard:
    """A shard this node serves, with what it keeps per session."""

    spec_id: str
    shard: Shard
    n_ctx: int
    max_sessions: int
    n_batch: int
    samplers: dict[str, Sampler] = field(default_factory=dict)
    kept: OutputLog = field(default_factory=OutputLog)  # outputs sent onward, for the next hop's recovery
    steps: dict[str, int] = field(default_factory=dict)  # per session, bumped by every step and rewind
    epochs: dict[str, int] = field(default_factory=dict)  # per session, the newest attempt seen
    bases: dict[str, KVBase] = field(default_factory=dict)  # per session, what its last checkpoint held
    # Held across (attempt check, compute, step count) and across rewinds, so a stale step cannot slip
    # between a recovery's rewind and the retried step.
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bump(self, session: str) -> int:
        self.steps[session] = n = self.steps.get(session, 0) + 1
        return n

    def enter(self, session: str, epoch: int) -> None:
        """Refuse a step of an older attempt (it was overtaken by a recovery); call with `lock` held."""
        current = self.epochs.get(session, 0)
        if epoch < current:
            raise BadInputError(f"stale step of session {session!r} (attempt {epoch}, the session is at attempt "
                                f"{current}); it was overtaken by a recovery")
        self.epochs[session] = epoch

    def forget(self, session: str) -> None:
        self.samplers.pop(session, None)
        self.steps.pop(session, None)
        self.epochs.pop(session, None)
        self.bases.pop(session, None)
        self.kept.drop(session)
        self.shard.drop_session(session)


class Onward:
    """A step this node has run: its reply, or, when the route goes on, the wait for the rest of it."""

    def __init__(self, reply: pb.ForwardReply | None = None, finish: Callable[[], pb.ForwardReply] | None = None,
                 cancel: Callable[[], object] | None = None):
        self._reply, self._finish, self._cancel = reply, finish, cancel

    def result(self) -> pb.ForwardReply:
        if self._finish is not None:
            self._reply, self._finish = self._finish(), None
        return self._reply

    def cancel(self) -> None:
        """Stop waiting: the rest of the route is told, and `result()` raises PeerError."""
        if self._cancel is not None:
            self._cancel()


class NodeService(pbg.NodeServicer):
    """One node's shards and sessions. `fetcher` returns the coordinator's FetchShard call when needed.

    A node usually holds one shard; after taking over a failed or departed node's range it holds that
    one too, until the next full plan. `checkpoint_sink` receives the KV checkpoints a step asks for
    (from a background thread, so the step does not wait for the network).
    """

    def __init__(
        self,
        key: str,
        fetcher: Callable[[], Callable[[pb.FetchShardRequest], Iterable[pb.ShardChunk]]] | None = None,
        threads: int | None = None,
        shard_dir: Path | None = None,
        progress: bool = True,
        reprofile: bool = False,
        checkpoint_sink: Callable[[Iterable[pb.Checkpoint]], pb.CheckpointReply | None] | None = None,
    ):
        self._key = key
        self._fetcher = fetcher
        self._threads = threads
        self._shard_dir = shard_dir
        self._progress = progress
        self._reprofile = reprofile  # measure compute again once, ignoring the cache (--reprofile)
        self._shards: dict[LayerRange, LoadedShard] = {}
        self._assign_lock = threading.Lock()
        self._last_used: dict[str, float] = {}
        self._inflight: dict[tuple[str, LayerRange], steps.StepCall] = {}  # steps waiting on the next hop
        self.links = steps.StepLinks(key)  # step connections to the next hops
        self._step_server: steps.StepServer | None = None
        self._channels: dict[str, tuple[pbg.NodeStub, grpc.Channel]] = {}
        self._channels_lock = threading.Lock()
        self._sink = checkpoint_sink
        # (first message, KV blob, shard entry, session id) of each checkpoint waiting to be pushed
        self._outbox: queue.Queue[tuple[pb.Checkpoint, bytes, LoadedShard, str] | None] = queue.Queue(
            maxsize=_MAX_PENDING_CHECKPOINTS)
        self._pusher: threading.Thread | None = None
        self.state = "idle"

    # ------------------------------------------------------------ assignment

    def ranges(self) -> list[LayerRange]:
        """The layer ranges this node serves, in order."""
        return sorted(self._shards, key=lambda r: r.start)

    @wire.served
    def Assign(self, request: pb.AssignRequest, context) -> pb.AssignReply:
        return self.assign(request)

    def assign(self, request: pb.AssignRequest) -> pb.AssignReply:
        """Load the shard named in `request` (fetching its file if needed), beside the others with `extra`,
        else instead of them; or drop every shard."""
        with self._assign_lock:
            if not request.has_shard:
                self._unload()
                self.state = "idle"
                return pb.AssignReply()
            spec = request.shard
            n_ctx, max_sessions, n_batch = int(request.n_ctx), int(request.max_sessions), int(request.n_batch)
            if not (0 < n_ctx <= _MAX_N_CTX and 0 < max_sessions <= _MAX_SESSIONS and 0 < n_batch <= n_ctx):
                raise BadInputError(
                    f"impossible shard settings n_ctx={n_ctx}, max_sessions={max_sessions}, n_batch={n_batch}"
                )
            layers = wire.layer_range(spec.layers)
            current = self._shards.get(layers)
            same = current is not None and (current.spec_id, current.n_ctx, current.max_sessions, current.n_batch) == (
                spec.shard_id, n_ctx, max_sessions, n_batch)
            if same and (request.extra or len(self._shards) == 1):
                return pb.AssignReply()
            for other in self._shards:
                if other != layers and other.start < layers.end and layers.start < other.end and request.extra:
                    raise BadInputError(f"layers {layers} overlap layers {other} that this node already serves")
            self.state = "loading"
            t0 = time.perf_counter()
            try:
                dest = self._shard_dir or cache.subdir("shards")
                if self._fetcher is None:
                    raise NotReadyError("this node has no coordinator to fetch shard files from")
                path, fetched = fetch_shard(self._fetcher(), spec, dest, progress=self._progress)
                info = shard_info(path)
                if info.shard_id != spec.shard_id or info.layers != layers:
                    raise BadInputError(
                        f"{path.name} holds shard {info.shard_id[:12]} ({info.layers}), not the assigned "
                        f"{spec.shard_id[:12]} ({layers}); delete it and join again"
                    )
                if request.extra:
                    self._unload(layers)
                else:
                    self._unload()
                shard = Shard(path, n_ctx=n_ctx, max_sessions=max_sessions, n_batch=n_batch, n_threads=self._threads)
            except Exception:
                self.state = "ready" if self._shards else "idle"
                raise
            self._shards[layers] = LoadedShard(spec.shard_id, shard, n_ctx, max_sessions, n_batch)
            self.state = "ready"
            load_s = time.perf_counter() - t0
            log.info("serving layers %s (%s; %.1f s to %s)%s", shard.layers, shard.role.value, load_s,
                     "fetch and load" if fetched else "load", " beside " + ", ".join(
                         str(r) for r in self.ranges() if r != layers) if len(self._shards) > 1 else "")
            return pb.AssignReply(fetched=fetched, load_s=load_s)

    # ------------------------------------------------------------ measurement

    @wire.served
    def Probe(self, request: pb.ProbeRequest, context) -> pb.ProbeReply:
        return self.probe(request)

    def probe(self, request: pb.ProbeRequest) -> pb.ProbeReply:
        """Measure this node's compute on the given middle slices of the model (cached)."""
        from .engine import default_threads
        from .profiling import cached_compute, measure_compute

        if not 1 <= len(request.shards) <= 4:
            raise BadInputError("a probe takes 1 to 4 shards")
        steps, tokens = int(request.decode_steps or 24), int(request.prefill_tokens or 128)
        if not (1 <= steps <= 256 and 1 <= tokens <= 512):
            raise BadInputError("a probe runs 1 to 256 decode steps and 1 to 512 prompt tokens")
        if self._fetcher is None:
            raise NotReadyError("this node has no coordinator to fetch probe shards from")
        if self.sessions():
            raise NotReadyError("this node is serving sessions; measure it between sessions")
        dest = self._shard_dir or cache.subdir("shards")

        def measure():  # only when the cache has no answer: fetching the slices is the slow part
            with contextlib.ExitStack() as held:
                fetched = (fetch_shard(self._fetcher(), spec, dest, progress=False)[0] for spec in request.shards)
                # A generator: each slice is held before the next fetch, whose eviction could take it.
                paths = [held.enter_context(shardcache.hold(path)) for path in fetched]
                return measure_compute(paths, self._threads, steps, tokens)

        with self._assign_lock:  # one measurement at a time, and not while a shard is being loaded
            profile, cached = cached_compute(
                [s.shard_id for s in request.shards], self._threads or default_threads(), measure,
                refresh=request.refresh or self._reprofile, params=(steps, tokens),
            )
            self._reprofile = False
        return pb.ProbeReply(decode_s_per_byte=profile.decode_s_per_byte, prefill_s_per_byte=profile.prefill_s_per_byte,
                             step_overhead_s=profile.step_overhead_s, cached=cached)

    @wire.served
    def Ping(self, request: pb.PingRequest, context) -> pb.PingReply:
        if request.reply_bytes > _MAX_PING:
            raise BadInputError(f"a ping reply is at most {_MAX_PING} bytes")
        return pb.PingReply(payload=bytes(request.reply_bytes))

    @wire.served
    def MeasureLink(self, request: pb.LinkRequest, context) -> pb.LinkReply:
        from .profiling import measure_link

        # Small bounds: a keyed peer should not be able to turn this node into a traffic source.
        if not (0 < request.payload_bytes <= 1 << 16 and 0 < request.count <= 32):
            raise BadInputError("a link measurement sends 1 to 65536 bytes, 1 to 32 times")
        # A channel of its own, closed afterwards: measuring must not leave connections behind.
        with wire.channel(wire.check_address(request.address), self._key) as ch:
            stub = pbg.NodeStub(ch)
            try:
                rtt, bw = measure_link(lambda r: stub.Ping(r, timeout=2.0), request.payload_bytes, request.count)
            except grpc.RpcError as e:
                raise PeerError(f"could not measure the link to {request.address}: {e.details()}") from None
        return pb.LinkReply(rtt_s=rtt, bandwidth_bps=bw)

    def _unload(self, only: LayerRange | None = None) -> None:
        for layers in [only] if only is not None else list(self._shards):
            loaded = self._shards.pop(layers, None)
            if loaded:
                loaded.shard.close()
        if not self._shards:
            self._last_used.clear()

    def _entry(self, expected: pb.LayerSpan) -> LoadedShard:
        want = wire.layer_range(expected)
        loaded = self._shards.get(want)
        if loaded is None:
            if not self._shards:
                raise NotReadyError("this node holds no shard yet; is it still loading? (see `swarm status`)")
            held = ", ".join(str(r) for r in self.ranges())
            raise NotReadyError(f"this node holds layers {held}, not {want}; the route is out of date, re-plan")
        return loaded

    # ------------------------------------------------------------ sessions

    @wire.served
    def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionReply:
        self.open_session(request)
        return pb.OpenSessionReply()

    def open_session(self, request: pb.OpenSessionRequest) -> None:
        """Open a session on one shard (starting it again from empty if it was open)."""
        entry = self._entry(request.layers)
        sid = _session_id(request.session_id)
        if len(request.history) > entry.n_ctx:
            raise BadInputError(f"a session's history is at most n_ctx ({entry.n_ctx}) tokens")
        sampler = None
        if entry.shard.role.gives_logits:
            sampler = Sampler(wire.sampling_from_pb(request.sampling), history=list(request.history))
        now = time.monotonic()
        for old, used in list(self._last_used.items()):
            if now - used > SESSION_IDLE_S:
                log.warning("dropping session %s: unused for %.0f s (abandoned by its coordinator?)", old, now - used)
                self.close_session(old)
        with entry.lock:
            entry.forget(sid)
            entry.shard.open_session(sid)
            entry.epochs[sid] = int(request.epoch)
            self._last_used[sid] = now
            if sampler is not None:
                entry.samplers[sid] = sampler

    @wire.served
    def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionReply:
        self.close_session(request.session_id)
        return pb.CloseSessionReply()

    def close_session(self, session_id: str) -> None:
        self._last_used.pop(session_id, None)
        for entry in list(self._shards.values()):
            entry.forget(session_id)

    def sessions(self) -> dict[str, int]:
        """Open sessions and how many positions each holds (on the first shard that has it)."""
        out: dict[str, int] = {}
        for layers in reversed(self.ranges()):
            entry = self._shards.get(layers)
            if entry is not None:
                out.update(entry.shard.sessions())
        return out

    # ------------------------------------------------------------ the step

    @wire.served
    def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardReply:
        return self.forward(request, context)

    def forward(self, request: pb.ForwardRequest, context=None) -> pb.ForwardReply:
        """Run this node's layers for one step, then the rest of the route; returns the sampled token."""
        return self.start_forward(request, context).result()

    def start_forward(self, request: pb.ForwardRequest, context=None) -> "Onward":
        """Run this node's layers for one step and send it on; `result()` of what it returns waits for the
        rest of the route (so the caller can do something else meanwhile), `cancel()` gives up on it."""
        t0 = time.perf_counter()
        entry = self._entry(request.layers)
        shard = entry.shard
        sid = _session_id(request.session_id)
        n = int(request.n_positions)
        start = int(request.start)
        if not 0 < n <= shard.n_batch:
            raise BadInputError(
                f"a step carries 1 to {shard.n_batch} positions (this shard's n_batch), got {n}"
            )
        if len(request.tokens) != n:
            raise BadInputError(f"the step carries {len(request.tokens)} token ids for {n} positions")
        if request.next:
            if not request.next[0].step_address:
                raise BadInputError("the route's next hop has no step address (Hop.step_address, HOST:PORT)")
            wire.check_address(request.next[0].step_address)
        if shard.role.takes_tokens:
            if request.hidden:
                raise BadInputError("a first shard takes token ids, not hidden states")
            x = list(request.tokens)
        else:
            x = wire.decode_hidden(request.hidden, n, shard.n_embd)
        t1 = time.perf_counter()
        with entry.lock:
            entry.enter(sid, int(request.epoch))
            out = shard.forward(sid, x, start)
            step = entry.bump(sid)
        self._last_used[sid] = time.monotonic()
        t2 = time.perf_counter()
        timing = pb.HopTiming(layers=request.layers, compute_ms=1e3 * (t2 - t1), codec_ms=1e3 * (t1 - t0))
        if shard.role.gives_logits:
            reply = pb.ForwardReply()
            sampler = entry.samplers.get(sid)
            if sampler is None:  # the session was closed while this step ran
                raise BadInputError(f"unknown session {sid!r} on this node; open it first")
            sampler.observe(request.tokens, start)
            if request.sample and not request.replay:
                reply.has_token = True
                reply.token = sampler.sample(out, remember=False, position=start + n - 1)
            timing.sample_ms = 1e3 * (time.perf_counter() - t2)
            if request.checkpoint and self._sink is not None:
                # Exported while the token travels back and the first hops run the next step: the lock,
                # taken here and released by the exporting thread, holds this shard's next step until then.
                entry.lock.acquire()
                threading.Thread(target=self._checkpoint, args=(entry, sid, True), daemon=True).start()
            timing.handler_ms = 1e3 * (time.perf_counter() - t0)
            reply.timings.append(timing)
            return Onward(reply)
        hidden = wire.encode_hidden(out)
        if start >= request.keep_from:  # what the next hop's recovery would need
            entry.kept.add(sid, KeptStep(start, tuple(request.tokens), hidden), int(request.keep_from))
        if request.replay:
            timing.handler_ms = 1e3 * (time.perf_counter() - t0)
            return Onward(pb.ForwardReply(timings=[timing]))
        if not request.next:
            self._undo(entry, sid, start, step)
            raise BadInputError(f"the route ends after layer {shard.layers.end}, but the model goes on; re-plan")
        hop = request.next[0]
        t3 = time.perf_counter()
        onward = pb.ForwardRequest(
            session_id=request.session_id, start=start, n_positions=n, tokens=request.tokens, hidden=hidden,
            layers=hop.layers, next=request.next[1:], sample=request.sample, checkpoint=hop.checkpoint,
            keep_from=hop.keep_from, epoch=request.epoch,
        )
        t4 = time.perf_counter()
        if context is not None and not context.is_active():  # the caller gave up while this node computed
            self._undo(entry, sid, start, step)
            raise PeerError("the step was cancelled by the previous hop")
        try:
            call = self.links.call(hop.step_address, onward, timeout=FORWARD_TIMEOUT_S)
            self._inflight[(sid, shard.layers)] = call
            # The caller gave up (a node further on hung): stop waiting too. A step that came over the
            # step stream is watched while waiting; one that came as a gRPC call says so by callback.
            watch = context if isinstance(context, steps.StepContext) else None
            if context is not None and watch is None and not context.add_callback(call.cancel):
                call.cancel()
            if request.checkpoint:  # while the next hops compute
                self._checkpoint(entry, sid)
        except Exception as e:
            raise self._onward_failed(e, entry, sid, start, step, hop) from None
        timing.codec_ms += 1e3 * (t4 - t3)

        def finish() -> pb.ForwardReply:
            try:
                reply = call.result(watch)
            except Exception as e:
                raise self._onward_failed(e, entry, sid, start, step, hop) from None
            self._inflight.pop((sid, shard.layers), None)
            t5 = time.perf_counter()
            timing.call_ms = 1e3 * (t5 - t4)
            timing.handler_ms = 1e3 * (t5 - t0)
            reply.timings.insert(0, timing)
            return reply

        return Onward(finish=finish, cancel=call.cancel)

    def _onward_failed(self, e: Exception, entry: LoadedShard, sid: str, start: int, step: int,
                       hop: pb.Hop) -> Exception:
        """The rest of the route failed: roll this hop back to stay in step with the ones after it; the
        error to raise."""
        self._inflight.pop((sid, entry.shard.layers), None)
        self._undo(entry, sid, start, step)
        if isinstance(e, grpc.FutureCancelledError) or (
                isinstance(e, grpc.RpcError) and e.code() == grpc.StatusCode.CANCELLED):
            return PeerError(f"the step was cancelled while next hop {hop.address} had it")
        if isinstance(e, grpc.RpcError) and e.code() in (grpc.StatusCode.UNAVAILABLE,
                                                         grpc.StatusCode.DEADLINE_EXCEEDED):
            return PeerError(f"next hop {hop.address} (layers {wire.layer_range(hop.layers)}) did not answer: "
                             f"{e.details()}")
        return e

    def _undo(self, entry: LoadedShard, sid: str, start: int, step: int) -> None:
        """Roll a failed step back, unless the session has moved on since (a recovery rewound it)."""
        with entry.lock:
            if entry.steps.get(sid) != step:
                return
            with contextlib.suppress(SwarmError):
                entry.shard.rollback(sid, start)
            entry.kept.truncate(sid, start)

    def cancel(self, session_id: str) -> None:
        """Stop waiting for the next hop on a session's step (it hung); the step fails with PeerError."""
        for (sid, _), future in list(self._inflight.items()):
            if sid == session_id:
                future.cancel()

    # ------------------------------------------------------------ recovery and migration

    @wire.served
    def Rewind(self, request: pb.RewindRequest, context) -> pb.RewindReply:
        return self.rewind(request)

    def rewind(self, request: pb.RewindRequest) -> pb.RewindReply:
        """Cut a session back to `length` positions on one shard (and what it kept for the next hop)."""
        entry = self._entry(request.layers)
        sid = _session_id(request.session_id)
        length = int(request.length)
        with entry.lock:
            entry.shard.session_length(sid)  # unknown sessions are refused before anything changes
            entry.enter(sid, int(request.epoch))
            entry.bump(sid)  # a step still unwinding from the failure must not roll back what comes next
            entry.shard.rollback(sid, length)
            entry.kept.truncate(sid, length)
            sampler = entry.samplers.get(sid)
            if sampler is not None:
                sampler.rewind(length)
            return pb.RewindReply(positions=entry.shard.session_length(sid))

    @wire.served
    def ImportKV(self, request_iterator, context) -> pb.ImportKVReply:
        return self.import_kv(request_iterator)

    def import_kv(self, pieces: Iterable[pb.ImportKVRequest]) -> pb.ImportKVReply:
        """Load a session's KV state into one shard (the session must be open), with the kept outputs;
        `pieces` as `wire.kv_pieces` makes them."""
        request, blob = wire.join_kv_pieces(pieces)
        entry = self._entry(request.layers)
        sid = _session_id(request.session_id)
        if sid not in entry.shard.sessions():
            raise BadInputError(f"session {sid!r} is not open on layers {entry.shard.layers}; open it first")
        steps = [KeptStep(int(k.start), tuple(k.tokens), bytes(k.hidden)) for k in request.kept]
        width = 4 * entry.shard.n_embd
        at = steps[0].start if steps else 0
        for s in steps:  # what a shard kept of its own outputs: contiguous steps of its hidden-state width
            if not s.tokens or s.start != at or len(s.hidden) != len(s.tokens) * width:
                raise BadInputError("kept outputs must be contiguous steps of at least one position, each with "
                                    f"{width} bytes of hidden state per position")
            at = s.end
        with entry.lock:
            entry.enter(sid, int(request.epoch))
            entry.bump(sid)
            if blob:
                entry.shard.import_kv(sid, blob)
            else:
                entry.shard.rollback(sid, 0)
            held = entry.shard.session_length(sid)
            if at > held:
                entry.shard.rollback(sid, 0)
                raise BadInputError(f"kept outputs go beyond the {held} positions the KV state holds")
            entry.kept.replace(sid, steps, int(request.keep_from))
        self._last_used[sid] = time.monotonic()
        return pb.ImportKVReply(positions=held)

    @wire.served
    def Resend(self, request: pb.ResendRequest, context) -> pb.ResendReply:
        return self.resend(request)

    def resend(self, request: pb.ResendRequest) -> pb.ResendReply:
        """Send the kept outputs from_position..to_position-1 to `to`, one step per original batch."""
        entry = self._entry(request.layers)
        sid = _session_id(request.session_id)
        steps = entry.kept.steps(sid, int(request.from_position), int(request.to_position))
        stub = self._stub(request.to.address)
        for s in steps:
            replay = pb.ForwardRequest(
                session_id=sid, start=s.start, n_positions=len(s.tokens), tokens=s.tokens, hidden=s.hidden,
                layers=request.to.layers, replay=True, keep_from=request.to.keep_from, epoch=request.epoch,
            )
            try:
                stub.Forward(replay, timeout=FORWARD_TIMEOUT_S)
            except grpc.RpcError as e:
                raise wire.from_rpc(e, f"node {request.to.address}") from None
        return pb.ResendReply(steps=len(steps), positions=sum(len(s.tokens) for s in steps))

    @wire.served
    def Handoff(self, request: pb.HandoffRequest, context) -> pb.HandoffReply:
        return self.handoff(request)

    def handoff(self, request: pb.HandoffRequest) -> pb.HandoffReply:
        """Ship a session's KV state and kept outputs to the node that takes this shard over."""
        entry = self._entry(request.layers)
        sid = _session_id(request.session_id)
        blob = entry.shard.export_kv(sid)
        steps, first = entry.kept.all(sid)
        message = pb.ImportKVRequest(session_id=sid, layers=request.to.layers, keep_from=first, epoch=request.epoch)
        kept = [pb.KeptStep(start=s.start, tokens=s.tokens, hidden=s.hidden) for s in steps]
        try:
            reply = self._stub(request.to.address).ImportKV(wire.kv_pieces(message, blob, kept),
                                                            timeout=FORWARD_TIMEOUT_S)
        except grpc.RpcError as e:
            raise wire.from_rpc(e, f"node {request.to.address}") from None
        entry.forget(sid)  # the session lives on the successor now
        return pb.HandoffReply(kv_bytes=len(blob), kept_steps=len(steps), positions=reply.positions)

    def _checkpoint(self, entry: LoadedShard, sid: str, locked: bool = False) -> None:
        """Export a session's KV state and queue it for the coordinator (never blocks on the network).

        `locked`: the caller already took `entry.lock` for this; it is released here."""
        if self._sink is None:
            if locked:
                entry.lock.release()
            return
        held = locked

        def taken() -> None:  # the state is copied out: the next step may run
            nonlocal held
            if held:
                held = False
                entry.lock.release()

        try:
            if not locked:
                entry.lock.acquire()
                held = True
            # Only what changed since the last checkpoint the coordinator took, when it took one.
            blob, positions, base = entry.shard.checkpoint_kv(sid, entry.bases.get(sid), taken=taken)
        except Exception as e:  # a checkpoint never fails the step; the next one starts a new chain
            entry.bases.pop(sid, None)
            log.warning("could not checkpoint session %s: %s", sid, e)
            return
        finally:
            taken()
        checkpoint = (pb.Checkpoint(session_id=sid, layers=wire.span(entry.shard.layers), positions=positions),
                      blob, entry, sid)
        if self._pusher is None:
            self._pusher = threading.Thread(target=self._push_loop, name="checkpoints", daemon=True)
            self._pusher.start()
        with entry.lock:  # before the pusher can answer for this one; not for a session dropped meanwhile
            old = entry.bases.get(sid)
            if base is None or sid not in entry.steps:
                entry.bases.pop(sid, None)
            elif old is None or old.edit != base.edit or old.n_past <= base.n_past:
                entry.bases[sid] = base
        try:
            self._outbox.put_nowait(checkpoint)  # the newest few; a slow link drops rather than queues
        except queue.Full:
            entry.bases.pop(sid, None)  # the next one cannot build on this one
            log.warning("checkpoints are not getting through to the coordinator; dropped one of session %s", sid)

    def _push_loop(self) -> None:
        while True:
            checkpoint = self._outbox.get()
            if checkpoint is None:
                return
            first, blob, entry, sid = checkpoint
            try:
                reply = self._sink(wire.kv_pieces(first, blob))
                taken = reply is None or not reply.need_full
            except Exception as e:  # the coordinator is away: the next checkpoint will do
                log.warning("checkpoint of session %s not delivered: %s", first.session_id, e)
                taken = False
            if not taken:  # the coordinator lacks what a delta would build on: send a full state next
                entry.bases.pop(sid, None)

    def _stub(self, address: str) -> pbg.NodeStub:
        with self._channels_lock:
            entry = self._channels.get(address)
            if entry is None:
                ch = wire.channel(wire.check_address(address), self._key)
                entry = self._channels[address] = (pbg.NodeStub(ch), ch)
            return entry[0]

    def serve_steps(self, server: steps.StepServer) -> None:
        """Take pipeline steps from other nodes over the step stream too (not only as gRPC Forward calls)."""
        self._step_server = server
        server.start(self.forward)

    def close(self) -> None:
        if self._step_server is not None:
            self._step_server.close()
        self.links.close()
        if self._pusher is not None:
            with contextlib.suppress(queue.Full):
                self._outbox.put_nowait(None)
        with self._assign_lock:
            self._unload()
        with self._channels_lock:
            stubs, self._channels = self._channels, {}
        for _, ch in stubs.values():
            ch.close()


def _session_id(text: str) -> str:
    if not text or len(text) > 128:
        raise BadInputError("a session id is 1 to 128 characters")
    return text
