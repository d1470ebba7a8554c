"""Protobuf <-> the project's own types (`swarm/messages.py`), once, at the wire's edge.

`x_pb` builds a message from a swarm type; `x_of` reads one back, checking what the type cannot say
for itself (counts that must agree, sizes within limits) and raising BadInputError otherwise.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Iterator

from .. import messages as m
from .._proto import swarm_pb2 as pb
from ..errors import BadInputError
from ..layers import LayerRange
from ..sampling import SamplingParams

# KV states (checkpoints, handovers) can be far larger than a message: they travel in pieces of this size.
KV_PIECE = int(os.environ.get("SWARM_KV_PIECE_BYTES") or 8 << 20)
MAX_KV_STATE = 64 << 30


# ---------------------------------------------------------------- small pieces


@functools.lru_cache(maxsize=1024)
def span(r: LayerRange) -> pb.LayerSpan:
    """A range's wire form, built once rather than once per token (treat as read-only)."""
    return pb.LayerSpan(start=r.start, end=r.end)


@functools.lru_cache(maxsize=1024)
def _range(start: int, end: int) -> LayerRange:
    return LayerRange(start, end)


def layers_of(s: pb.LayerSpan) -> LayerRange:
    return _range(int(s.start), int(s.end))


def sampling_pb(p: SamplingParams) -> pb.Sampling:
    return pb.Sampling(
        temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
        repeat_penalty=p.repeat_penalty, repeat_last_n=p.repeat_last_n,
        has_seed=p.seed is not None, seed=p.seed or 0,
    )


def sampling_of(s: pb.Sampling) -> SamplingParams:
    """Validated sampling parameters (BadInputError names the bad field)."""
    # proto3 leaves unset numbers at 0: top_p 0 and repeat_penalty 0 mean "off", as 1.0 does.
    return SamplingParams(
        temperature=float(s.temperature), top_k=int(s.top_k), top_p=float(s.top_p) or 1.0, min_p=float(s.min_p),
        repeat_penalty=float(s.repeat_penalty) or 1.0, repeat_last_n=int(s.repeat_last_n),
        seed=int(s.seed) if s.has_seed else None,
    )


def resources_pb(r: m.Resources) -> pb.NodeResources:
    return pb.NodeResources(
        memory_total=r.memory_total, memory_available=r.memory_available, max_memory=r.max_memory,
        threads=r.threads, cpu_count=r.cpu_count,
        devices=[pb.Device(name=d.name, type=d.type, memory_free=d.memory_free, memory_total=d.memory_total)
                 for d in r.devices])


def resources_of(r: pb.NodeResources) -> m.Resources:
    return m.Resources(
        memory_total=int(r.memory_total), memory_available=int(r.memory_available), max_memory=int(r.max_memory),
        threads=int(r.threads), cpu_count=int(r.cpu_count),
        devices=tuple(m.Device(d.name, d.type, int(d.memory_free), int(d.memory_total)) for d in r.devices))


def shard_spec_pb(s: m.ShardSpec) -> pb.ShardSpec:
    return pb.ShardSpec(shard_id=s.shard_id, file_name=s.file_name, size=s.size, sha256=s.sha256,
                        layers=span(s.layers), n_layer_total=s.n_layer_total, model_url=s.model_url)


def shard_spec_of(s: pb.ShardSpec) -> m.ShardSpec:
    return m.ShardSpec(s.shard_id, s.file_name, int(s.size), s.sha256, layers_of(s.layers), int(s.n_layer_total),
                       s.model_url)


def chunk_pb(c: m.ShardChunk) -> pb.ShardChunk:
    return pb.ShardChunk(offset=c.offset, data=c.data, sha256=c.sha256, file_size=c.file_size)


def chunk_of(c: pb.ShardChunk) -> m.ShardChunk:
    return m.ShardChunk(int(c.offset), bytes(c.data), c.sha256, int(c.file_size))


def load_pb(order: m.Load) -> pb.AssignRequest:
    if order.shard is None:
        out = pb.AssignRequest(has_shard=False)
        if order.drop is not None:
            out.drop.CopyFrom(span(order.drop))
        return out
    s = order.settings
    return pb.AssignRequest(has_shard=True, extra=order.extra, shard=shard_spec_pb(order.shard), n_ctx=s.n_ctx,
                            max_sessions=s.max_sessions, n_batch=s.n_batch)


def load_of(r: pb.AssignRequest) -> m.Load:
    if not r.has_shard:
        return m.Load(None, drop=layers_of(r.drop) if r.HasField("drop") else None)
    return m.Load(shard_spec_of(r.shard), m.ContextSettings(int(r.n_ctx), int(r.max_sessions), int(r.n_batch)),
                  bool(r.extra))


def probe_pb(p: m.ProbeOrder) -> pb.ProbeRequest:
    return pb.ProbeRequest(shards=[shard_spec_pb(s) for s in p.shards], decode_steps=p.decode_steps,
                           prefill_tokens=p.prefill_tokens, refresh=p.refresh)


def probe_of(r: pb.ProbeRequest) -> m.ProbeOrder:
    return m.ProbeOrder(tuple(shard_spec_of(s) for s in r.shards), int(r.decode_steps or 24),
                        int(r.prefill_tokens or 128), bool(r.refresh))


def probe_result_pb(r: m.ProbeResult) -> pb.ProbeReply:
    p = r.profile
    return pb.ProbeReply(decode_s_per_byte=p.decode_s_per_byte, prefill_s_per_byte=p.prefill_s_per_byte,
                         step_overhead_s=p.step_overhead_s, cached=r.cached)


def probe_result_of(r: pb.ProbeReply) -> m.ProbeResult:
    return m.ProbeResult(m.ComputeProfile(r.decode_s_per_byte, r.prefill_s_per_byte, r.step_overhead_s), r.cached)


# ---------------------------------------------------------------- membership


def join_pb(j: m.JoinRequest) -> pb.JoinRequest:
    out = pb.JoinRequest(name=j.name, host=j.host, port=j.port, step_port=j.step_port,
                         resources=resources_pb(j.resources), has_pin=j.pin is not None, version=j.version,
                         leave_after_s=j.leave_after_s, outbound_only=j.outbound_only)
    if j.pin is not None:
        out.pin.CopyFrom(span(j.pin))
    return out


def join_of(r: pb.JoinRequest) -> m.JoinRequest:
    return m.JoinRequest(name=r.name, port=int(r.port), step_port=int(r.step_port),
                         resources=resources_of(r.resources), host=r.host,
                         pin=layers_of(r.pin) if r.has_pin else None, version=r.version,
                         leave_after_s=float(r.leave_after_s), outbound_only=r.outbound_only)


# ---------------------------------------------------------------- a pipeline step


def _hop_pb(h: m.Hop) -> pb.Hop:
    return pb.Hop(address=h.address, layers=span(h.layers), checkpoint=h.checkpoint, keep_from=h.keep_from,
                  step_address=h.steps)


def hop_of(h: pb.Hop) -> m.Hop:
    return m.Hop(h.address, layers_of(h.layers), h.step_address, h.checkpoint, int(h.keep_from))


def step_pb(s: m.Step) -> pb.ForwardRequest:
    return pb.ForwardRequest(
        session_id=s.session, start=s.start, n_positions=len(s.tokens), tokens=s.tokens, hidden=s.hidden,
        layers=span(s.layers), next=[_hop_pb(h) for h in s.next], sample=s.sample, replay=s.replay,
        checkpoint=s.checkpoint, keep_from=s.keep_from, epoch=s.epoch,
    )


def step_of(r: pb.ForwardRequest) -> m.Step:
    tokens = tuple(r.tokens)
    if len(tokens) != r.n_positions:
        raise BadInputError(f"the step carries {len(tokens)} token ids for {r.n_positions} positions")
    return m.Step(
        session=r.session_id, start=int(r.start), tokens=tokens, layers=layers_of(r.layers), hidden=r.hidden,
        next=tuple(hop_of(h) for h in r.next), sample=r.sample, replay=r.replay, checkpoint=r.checkpoint,
        keep_from=int(r.keep_from), epoch=int(r.epoch),
    )


def step_result_pb(s: m.StepResult) -> pb.ForwardReply:
    return pb.ForwardReply(
        has_token=s.token is not None, token=s.token or 0,
        timings=[pb.HopTiming(layers=span(t.layers), compute_ms=t.compute_ms, codec_ms=t.codec_ms,
                              sample_ms=t.sample_ms, call_ms=t.call_ms, handler_ms=t.handler_ms) for t in s.timings])


def step_result_of(r: pb.ForwardReply) -> m.StepResult:
    return m.StepResult(
        token=int(r.token) if r.has_token else None,
        timings=tuple(m.HopTiming(layers_of(t.layers), t.compute_ms, t.codec_ms, t.sample_ms, t.call_ms,
                                  t.handler_ms) for t in r.timings))


# ---------------------------------------------------------------- sessions on a node


def open_pb(o: m.OpenSession) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(session_id=o.session, layers=span(o.layers), sampling=sampling_pb(o.sampling),
                                 history=o.history, epoch=o.epoch)


def open_of(r: pb.OpenSessionRequest) -> m.OpenSession:
    return m.OpenSession(r.session_id, layers_of(r.layers), sampling_of(r.sampling), tuple(r.history), int(r.epoch))


def rewind_pb(w: m.Rewind) -> pb.RewindRequest:
    return pb.RewindRequest(session_id=w.session, layers=span(w.layers), length=w.length, epoch=w.epoch)


def rewind_of(r: pb.RewindRequest) -> m.Rewind:
    return m.Rewind(r.session_id, layers_of(r.layers), int(r.length), int(r.epoch))


def resend_pb(s: m.Resend) -> pb.ResendRequest:
    return pb.ResendRequest(session_id=s.session, layers=span(s.layers), from_position=s.start, to_position=s.end,
                            to=_hop_pb(s.to), epoch=s.epoch)


def resend_of(r: pb.ResendRequest) -> m.Resend:
    return m.Resend(r.session_id, layers_of(r.layers), int(r.from_position), int(r.to_position), hop_of(r.to),
                    int(r.epoch))


def handoff_pb(h: m.Handoff) -> pb.HandoffRequest:
    return pb.HandoffRequest(session_id=h.session, layers=span(h.layers), to=_hop_pb(h.to), epoch=h.epoch)


def handoff_of(r: pb.HandoffRequest) -> m.Handoff:
    return m.Handoff(r.session_id, layers_of(r.layers), hop_of(r.to), int(r.epoch))


def import_pieces(state: m.ImportState, blob: bytes) -> Iterator[pb.ImportKVRequest]:
    first = pb.ImportKVRequest(session_id=state.session, layers=span(state.layers), keep_from=state.keep_from,
                               epoch=state.epoch, mode=state.mode)
    kept = [pb.KeptStep(start=k.start, tokens=k.tokens, hidden=k.hidden) for k in state.kept]
    return _pieces(first, blob, kept)


def import_of(pieces: Iterable[pb.ImportKVRequest]) -> tuple[m.ImportState, bytes]:
    first, blob = _joined(pieces)
    kept = tuple(m.KeptStep(int(k.start), tuple(k.tokens), bytes(k.hidden)) for k in first.kept)
    return m.ImportState(first.session_id, layers_of(first.layers), int(first.keep_from), int(first.epoch),
                         kept, first.mode), blob


def checkpoint_pieces(c: m.Checkpoint, blob: bytes) -> Iterator[pb.Checkpoint]:
    return _pieces(pb.Checkpoint(session_id=c.session, layers=span(c.layers), positions=c.positions), blob)


def checkpoint_of(pieces: Iterable[pb.Checkpoint]) -> tuple[m.Checkpoint, bytes]:
    first, blob = _joined(pieces)
    return m.Checkpoint(first.session_id, layers_of(first.layers), int(first.positions)), blob


def _pieces(first, blob: bytes, kept: list = ()) -> Iterator:
    """`first` (every field but `kv` set) with the first piece of `blob`, then messages of its type with the
    rest, then the kept steps (ImportKVRequest) a piece's worth at a time."""
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


def _joined(messages: Iterable):
    """The inverse of _pieces: (the first message, with every piece's kept steps; the whole blob)."""
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
