"""The gRPC services, kept thin: translate the request, call the room, translate the answer.

Swarm errors become status codes (`codes.served`); nothing a handler raises crashes the server.
"""

from __future__ import annotations

from .._proto import swarm_pb2 as pb
from .._proto import swarm_pb2_grpc as pbg
from . import convert as cv
from . import convert_client as cc
from .codes import served, served_stream


class NodeServicer(pbg.NodeServicer):
    """A node's `Node` service over a `node.Node`."""

    def __init__(self, node):
        self.node = node

    @classmethod
    def add_to(cls, server, node) -> None:
        pbg.add_NodeServicer_to_server(cls(node), server)

    @served
    def Assign(self, request, context):
        loaded = self.node.load(cv.load_of(request))
        return pb.AssignReply(fetched=loaded.fetched, load_s=loaded.load_s)

    @served
    def Probe(self, request, context):
        return cv.probe_result_pb(self.node.probe(cv.probe_of(request)))

    @served
    def Ping(self, request, context):
        return pb.PingReply(payload=self.node.ping(int(request.reply_bytes)))

    @served
    def MeasureLink(self, request, context):
        link = self.node.measure_link(request.address, int(request.payload_bytes), int(request.count))
        return pb.LinkReply(rtt_s=link.rtt_s, bandwidth_bps=link.bandwidth_bps)

    @served
    def OpenSession(self, request, context):
        self.node.open_session(cv.open_of(request))
        return pb.OpenSessionReply()

    @served
    def CloseSession(self, request, context):
        self.node.close_session(request.session_id)
        return pb.CloseSessionReply()

    @served
    def Forward(self, request, context):
        return cv.step_result_pb(self.node.step(cv.step_of(request), context))

    @served
    def Rewind(self, request, context):
        return pb.RewindReply(positions=self.node.rewind(cv.rewind_of(request)))

    @served
    def ImportKV(self, request_iterator, context):
        return pb.ImportKVReply(positions=self.node.import_state(*cv.import_of(request_iterator)))

    @served
    def Resend(self, request, context):
        return pb.ResendReply(positions=self.node.resend(cv.resend_of(request)))

    @served
    def Handoff(self, request, context):
        return pb.HandoffReply(positions=self.node.handoff(cv.handoff_of(request)))


def _peer_host(peer: str) -> str:
    """The IP a call came from ('ipv4:10.0.0.5:51234' -> '10.0.0.5')."""
    if peer.startswith("ipv4:") or peer.startswith("ipv6:"):
        return peer[5:].rsplit(":", 1)[0]
    return "127.0.0.1"


class CoordinatorServicer(pbg.CoordinatorServicer):
    """The `Coordinator` service over a `coordinator.Coordinator`."""

    def __init__(self, coordinator):
        self.c = coordinator

    @classmethod
    def add_to(cls, server, coordinator) -> None:
        pbg.add_CoordinatorServicer_to_server(cls(coordinator), server)

    @served
    def Join(self, request, context):
        welcome = self.c.join(cv.join_of(request), _peer_host(context.peer()))
        return pb.JoinReply(node_id=welcome.node_id, heartbeat_interval_s=welcome.heartbeat_s,
                            model_name=welcome.model_name, name=welcome.name,
                            outbound_only=bool(welcome.relay_port), relay_host=welcome.relay_host,
                            relay_port=welcome.relay_port, relay_token=welcome.relay_token)

    @served
    def Heartbeat(self, request, context):
        resources = cv.resources_of(request.resources) if request.HasField("resources") else None
        return pb.HeartbeatReply(known=self.c.heartbeat(request.node_id, resources))

    @served
    def Leave(self, request, context):
        farewell = self.c.leave(request.node_id, request.graceful)
        return pb.LeaveReply(migrated_sessions=farewell.migrated_sessions, detail=farewell.detail)

    @served
    def StoreCheckpoint(self, request_iterator, context):
        return pb.CheckpointReply(need_full=not self.c.store_checkpoint(*cv.checkpoint_of(request_iterator)))

    @served_stream
    def FetchShard(self, request, context):
        for chunk in self.c.fetch_chunks(request.shard_id, int(request.offset)):
            yield cv.chunk_pb(chunk)

    @served_stream
    def Generate(self, request, context):
        for event in self.c.generate(cc.generate_of(request), context.is_active):
            yield cc.event_pb(event)

    @served
    def Status(self, request, context):
        return cc.status_pb(self.c.status())
