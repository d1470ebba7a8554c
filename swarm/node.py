"""A node's service: hold one shard, run its layers for each step, pass hidden states to the next hop.

The final shard samples; the token travels back along the chain of calls to whoever started the step.
A node checks every request before llama.cpp sees it and keeps serving after a bad one.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import grpc

from . import cache, wire
from ._proto import swarm_pb2 as pb
from ._proto import swarm_pb2_grpc as pbg
from .engine import Shard
from .errors import BadInputError, NotReadyError, PeerError
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


@dataclass(frozen=True)
class LoadedShard:
    spec_id: str
    shard: Shard
    n_ctx: int
    max_sessions: int
    n_batch: int


class NodeService(pbg.NodeServicer):
    """One node's shard and sessions. `fetcher` returns the coordinator's FetchShard call when needed."""

    def __init__(
        self,
        key: str,
        fetcher: Callable[[], Callable[[pb.FetchShardRequest], Iterable[pb.ShardChunk]]] | None = None,
        threads: int | None = None,
        shard_dir: Path | None = None,
        progress: bool = True,
        reprofile: bool = False,
    ):
        self._key = key
        self._fetcher = fetcher
        self._threads = threads
        self._shard_dir = shard_dir
        self._progress = progress
        self._reprofile = reprofile  # measure compute again once, ignoring the cache (--reprofile)
        self._loaded: LoadedShard | None = None
        self._assign_lock = threading.Lock()
        self._samplers: dict[str, Sampler] = {}
        self._last_used: dict[str, float] = {}
        self._channels: dict[str, tuple[pbg.NodeStub, grpc.Channel]] = {}
        self._channels_lock = threading.Lock()
        self.state = "idle"

    # ------------------------------------------------------------ assignment

    @property
    def layers(self) -> LayerRange | None:
        return self._loaded.shard.layers if self._loaded else None

    @wire.served
    def Assign(self, request: pb.AssignRequest, context) -> pb.AssignReply:
        return self.assign(request)

    def assign(self, request: pb.AssignRequest) -> pb.AssignReply:
        """Load the shard named in `request` (fetching its file if needed), or drop the current one."""
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
            current = self._loaded
            if current and (current.spec_id, current.n_ctx, current.max_sessions, current.n_batch) == (
                spec.shard_id, n_ctx, max_sessions, n_batch
            ):
                return pb.AssignReply()
            self.state = "loading"
            t0 = time.perf_counter()
            try:
                dest = self._shard_dir or cache.subdir("shards")
                if self._fetcher is None:
                    raise NotReadyError("this node has no coordinator to fetch shard files from")
                path, fetched = fetch_shard(self._fetcher(), spec, dest, progress=self._progress)
                info = shard_info(path)
                if info.shard_id != spec.shard_id or info.layers != wire.layer_range(spec.layers):
                    raise BadInputError(
                        f"{path.name} holds shard {info.shard_id[:12]} ({info.layers}), not the assigned "
                        f"{spec.shard_id[:12]} ({wire.layer_range(spec.layers)}); delete it and join again"
                    )
                self._unload()
                shard = Shard(path, n_ctx=n_ctx, max_sessions=max_sessions, n_batch=n_batch, n_threads=self._threads)
            except Exception:
                self.state = "idle"
                raise
            self._loaded = LoadedShard(spec.shard_id, shard, n_ctx, max_sessions, n_batch)
            self.state = "ready"
            load_s = time.perf_counter() - t0
            log.info("serving layers %s (%s; %.1f s to %s)", shard.layers, shard.role.value, load_s,
                     "fetch and load" if fetched else "load")
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
            paths = [fetch_shard(self._fetcher(), spec, dest, progress=False)[0] for spec in request.shards]
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

    def _unload(self) -> None:
        loaded, self._loaded = self._loaded, None
        self._samplers.clear()
        self._last_used.clear()
        if loaded:
            loaded.shard.close()

    def _shard(self, expected: pb.LayerSpan) -> Shard:
        loaded = self._loaded
        if loaded is None:
            raise NotReadyError("this node holds no shard yet; is it still loading? (see `swarm status`)")
        want = wire.layer_range(expected)
        if loaded.shard.layers != want:
            raise NotReadyError(
                f"this node holds layers {loaded.shard.layers}, not {want}; the route is out of date, re-plan"
            )
        return loaded.shard

    # ------------------------------------------------------------ sessions

    @wire.served
    def OpenSession(self, request: pb.OpenSessionRequest, context) -> pb.OpenSessionReply:
        self.open_session(request)
        return pb.OpenSessionReply()

    def open_session(self, request: pb.OpenSessionRequest) -> None:
        shard = self._shard(request.layers)
        sid = _session_id(request.session_id)
        sampler = Sampler(wire.sampling_from_pb(request.sampling)) if shard.role.gives_logits else None
        now = time.monotonic()
        for old, used in list(self._last_used.items()):
            if now - used > SESSION_IDLE_S:
                log.warning("dropping session %s: unused for %.0f s (abandoned by its coordinator?)", old, now - used)
                self.close_session(old)
        shard.open_session(sid)
        self._last_used[sid] = now
        if sampler is not None:
            self._samplers[sid] = sampler

    @wire.served
    def CloseSession(self, request: pb.CloseSessionRequest, context) -> pb.CloseSessionReply:
        self.close_session(request.session_id)
        return pb.CloseSessionReply()

    def close_session(self, session_id: str) -> None:
        self._samplers.pop(session_id, None)
        self._last_used.pop(session_id, None)
        loaded = self._loaded
        if loaded:
            loaded.shard.drop_session(session_id)

    def sessions(self) -> dict[str, int]:
        loaded = self._loaded
        return loaded.shard.sessions() if loaded else {}

    # ------------------------------------------------------------ the step

    @wire.served
    def Forward(self, request: pb.ForwardRequest, context) -> pb.ForwardReply:
        return self.forward(request)

    def forward(self, request: pb.ForwardRequest) -> pb.ForwardReply:
        """Run this node's layers for one step, then the rest of the route; returns the sampled token."""
        t0 = time.perf_counter()
        shard = self._shard(request.layers)
        sid = _session_id(request.session_id)
        n = int(request.n_positions)
        if not 0 < n <= shard.n_batch:
            raise BadInputError(
                f"a step carries 1 to {shard.n_batch} positions (this shard's n_batch), got {n}"
            )
        if len(request.tokens) != n:
            raise BadInputError(f"the step carries {len(request.tokens)} token ids for {n} positions")
        if shard.role.takes_tokens:
            if request.hidden:
                raise BadInputError("a first shard takes token ids, not hidden states")
            x = list(request.tokens)
        else:
            x = wire.decode_hidden(request.hidden, n, shard.n_embd)
        t1 = time.perf_counter()
        out = shard.forward(sid, x, int(request.start))
        self._last_used[sid] = time.monotonic()
        t2 = time.perf_counter()
        timing = pb.HopTiming(layers=request.layers, compute_ms=1e3 * (t2 - t1), codec_ms=1e3 * (t1 - t0))
        if shard.role.gives_logits:
            reply = pb.ForwardReply()
            sampler = self._samplers.get(sid)
            if sampler is None:  # the session was closed while this step ran
                raise BadInputError(f"unknown session {sid!r} on this node; open it first")
            sampler.observe(request.tokens)
            if request.sample:
                reply.has_token = True
                reply.token = sampler.sample(out, remember=False)
            timing.sample_ms = 1e3 * (time.perf_counter() - t2)
            timing.handler_ms = 1e3 * (time.perf_counter() - t0)
            reply.timings.append(timing)
            return reply
        if not request.next:
            shard.rollback(sid, int(request.start))
            raise BadInputError(f"the route ends after layer {shard.layers.end}, but the model goes on; re-plan")
        hop = request.next[0]
        t3 = time.perf_counter()
        onward = pb.ForwardRequest(
            session_id=request.session_id, start=request.start, n_positions=n, tokens=request.tokens,
            hidden=wire.encode_hidden(out), layers=hop.layers, next=request.next[1:], sample=request.sample,
        )
        t4 = time.perf_counter()
        try:
            reply = self._stub(hop.address).Forward(onward, timeout=FORWARD_TIMEOUT_S)
        except grpc.RpcError as e:
            shard.rollback(sid, int(request.start))  # keep this shard in step with the ones after it
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise PeerError(f"next hop {hop.address} (layers {wire.layer_range(hop.layers)}) did not answer: "
                                f"{e.details()}") from None
            raise
        except Exception:
            shard.rollback(sid, int(request.start))
            raise
        t5 = time.perf_counter()
        timing.codec_ms += 1e3 * (t4 - t3)
        timing.call_ms = 1e3 * (t5 - t4)
        timing.handler_ms = 1e3 * (t5 - t0)
        reply.timings.insert(0, timing)
        return reply

    def _stub(self, address: str) -> pbg.NodeStub:
        with self._channels_lock:
            entry = self._channels.get(address)
            if entry is None:
                ch = wire.channel(wire.check_address(address), self._key)
                entry = self._channels[address] = (pbg.NodeStub(ch), ch)
            return entry[0]

    def close(self) -> None:
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
