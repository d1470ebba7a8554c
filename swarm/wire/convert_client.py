"""Protobuf <-> the project's own types for what clients see: generation requests, their events, status."""

from __future__ import annotations

from google.protobuf import json_format

from .. import messages as m
from .._proto import swarm_pb2 as pb
from ..errors import BadInputError
from .convert import resources_pb, sampling_of, sampling_pb, span


def generate_pb(r: m.GenerateRequest) -> pb.GenerateRequest:
    out = pb.GenerateRequest(max_tokens=r.max_tokens, sampling=sampling_pb(r.sampling), stop=r.stop,
                             timings=r.timings)
    if r.messages is not None:
        out.chat.CopyFrom(pb.ChatInput(messages=[pb.ChatMessage(role=a, content=b) for a, b in r.messages]))
    elif r.prompt is not None:
        out.prompt = r.prompt
    return out


def generate_of(r: pb.GenerateRequest) -> m.GenerateRequest:
    kind = r.WhichOneof("input")
    if kind is None:
        raise BadInputError("a generate request needs a prompt or chat messages")
    sampling = sampling_of(r.sampling) if r.HasField("sampling") else m.SamplingParams()
    return m.GenerateRequest(
        prompt=r.prompt if kind == "prompt" else None,
        messages=tuple((x.role, x.content) for x in r.chat.messages) if kind == "chat" else None,
        max_tokens=int(r.max_tokens), sampling=sampling, stop=tuple(r.stop), timings=r.timings)


def _timings_pb(t: m.StepTimings) -> pb.StepTimings:
    return pb.StepTimings(steps=t.steps, compute_ms=t.compute_ms, serialization_ms=t.serialization_ms,
                          network_ms=t.network_ms, sampling_ms=t.sampling_ms)


def event_pb(e: m.GenerateEvent) -> pb.GenerateEvent:
    if isinstance(e, m.Piece):
        return pb.GenerateEvent(piece=pb.GenerateEvent.Piece(text=e.text, tokens=e.tokens))
    if isinstance(e, m.Started):
        return pb.GenerateEvent(started=pb.GenerateEvent.Started(session_id=e.session_id,
                                                                 prompt_tokens=e.prompt_tokens))
    return pb.GenerateEvent(done=pb.GenerateEvent.Done(
        finish_reason=e.finish_reason, prompt_tokens=e.prompt_tokens, completion_tokens=e.completion_tokens,
        first_token_ms=e.first_token_ms, decode_tokens_per_s=e.decode_tokens_per_s,
        decode_timings=_timings_pb(e.timings)))


def event_of(e: pb.GenerateEvent) -> m.GenerateEvent:
    kind = e.WhichOneof("event")
    if kind == "piece":
        return m.Piece(e.piece.text, tuple(e.piece.tokens))
    if kind == "started":
        return m.Started(e.started.session_id, int(e.started.prompt_tokens))
    d, t = e.done, e.done.decode_timings
    return m.Done(d.finish_reason, int(d.prompt_tokens), int(d.completion_tokens), d.first_token_ms,
                  d.decode_tokens_per_s, m.StepTimings(int(t.steps), t.compute_ms, t.serialization_ms, t.network_ms,
                                                       t.sampling_ms))


def status_pb(s: m.StatusReport) -> pb.StatusReply:
    reply = pb.StatusReply(
        swarm=s.swarm, model_name=s.model_name, n_layer=s.n_layer, state=s.state, detail=s.detail, n_ctx=s.n_ctx,
        max_sessions=s.max_sessions, predicted_decode_tps=s.predicted_decode_tps,
        measured_decode_tps=s.measured_decode_tps, measured_sessions=s.measured_sessions,
        chat_template=s.chat_template,
        checkpoints=pb.CheckpointCounts(full=s.checkpoints.full, deltas=s.checkpoints.deltas,
                                        full_bytes=s.checkpoints.full_bytes, delta_bytes=s.checkpoints.delta_bytes,
                                        refused=s.checkpoints.refused))
    for n in s.nodes:
        ns = reply.nodes.add(
            node_id=n.node_id, name=n.name, address=n.address, step_address=n.steps,
            resources=resources_pb(n.resources), has_layers=n.layers is not None, pinned=n.pinned, state=n.state,
            last_seen_s=n.last_seen_s, is_coordinator=n.is_coordinator, detail=n.detail,
            outbound_only=n.outbound_only, relayed_because=n.relayed_because,
            extra_layers=[span(r) for r in n.extra_layers])
        if n.layers is not None:
            ns.layers.CopyFrom(span(n.layers))
        if n.profile is not None:
            link = n.link or m.Link(0.0, float("inf"))
            ns.profile.CopyFrom(pb.NodeProfile(
                decode_ns_per_byte=1e9 * n.profile.decode_s_per_byte,
                prefill_ns_per_byte=1e9 * n.profile.prefill_s_per_byte,
                step_overhead_ms=1e3 * n.profile.step_overhead_s, rtt_ms=1e3 * link.rtt_s,
                bandwidth_mbps=0.0 if link.bandwidth_bps == float("inf") else link.bandwidth_bps / 1e6,
                reason=n.reason, cached=n.profile_cached))
    for x in s.sessions:
        reply.sessions.add(session_id=x.session_id, positions=x.positions, generated=x.generated, age_s=x.age_s,
                           checkpoint_bytes=x.checkpoint_bytes)
    for r in s.recoveries:
        rec = reply.recoveries.add(
            at_unix=r.at_unix, node=r.node, address=r.address, detection=r.detection, path=r.path,
            sessions=r.sessions, stall_ms=1e3 * r.stall_s, successor=r.successor,
            replayed_positions=r.replayed_positions, detail=r.detail)
        if r.layers is not None:
            rec.layers.CopyFrom(span(r.layers))
    for b in s.standbys:
        reply.standbys.add(layers=span(b.layers), node=b.node, guards=b.guards, bytes=b.nbytes, state=b.state,
                           checkpoints=b.checkpoints)
    return reply


def status_dict(reply: pb.StatusReply) -> dict:
    """The status as a plain dict (what `swarm status --json` prints), every field present."""
    return json_format.MessageToDict(reply, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def timings_dict(t: m.StepTimings) -> dict:
    return {"steps": t.steps, "compute_ms": t.compute_ms, "serialization_ms": t.serialization_ms,
            "network_ms": t.network_ms, "sampling_ms": t.sampling_ms}




def report_dict(s: m.StatusReport) -> dict:
    """A status report as the plain dict `swarm status --json` prints (for the HTTP status endpoint)."""
    return status_dict(status_pb(s))
