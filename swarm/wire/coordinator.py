"""The coordinator over the network, as Python methods that speak the project's types.

Nodes use it to join, heartbeat, leave, hand in checkpoints and fetch shard files; clients to generate
and read the status. Every failed call raises the swarm error it stands for, naming the coordinator.
"""

from __future__ import annotations

from typing import Iterator

import grpc

from .. import messages as m
from .._proto import swarm_pb2 as pb
from .._proto import swarm_pb2_grpc as pbg
from . import convert as cv
from . import convert_client as cc
from .channels import channel, check_address
from .codes import from_rpc


class Streamed:
    """The replies of a streaming call, converted; `cancel()` stops the call (a no-op once it ended)."""

    def __init__(self, call, convert, where: str):
        self._call, self._convert, self._where = call, convert, where

    def __iter__(self) -> Iterator:
        try:
            for reply in self._call:
                yield self._convert(reply)
        except grpc.RpcError as e:
            raise from_rpc(e, self._where) from None

    def cancel(self) -> None:
        self._call.cancel()


class CoordinatorLink:
    """A channel to a swarm's coordinator that presents the swarm key."""

    def __init__(self, address: str, key: str):
        self.address = check_address(address)
        self._where = f"coordinator {self.address}"
        self._channel = channel(self.address, key)
        self._stub = pbg.CoordinatorStub(self._channel)

    def _call(self, method: str, request, timeout: float):
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc(e, self._where) from None

    # ------------------------------------------------------------ for nodes

    def join(self, request: m.JoinRequest, timeout: float = 10.0) -> m.Welcome:
        reply = self._call("Join", cv.join_pb(request), timeout)
        return m.Welcome(reply.node_id, reply.heartbeat_interval_s, reply.model_name, reply.name,
                         reply.relay_host, int(reply.relay_port) if reply.outbound_only else 0, reply.relay_token)

    def heartbeat(self, node_id: str, resources: m.Resources | None, timeout: float = 3.0) -> bool:
        """Whether the coordinator still knows this node (False: it restarted; join again)."""
        request = pb.HeartbeatRequest(node_id=node_id)
        if resources is not None:
            request.resources.CopyFrom(cv.resources_pb(resources))
        return self._call("Heartbeat", request, timeout).known

    def leave(self, node_id: str, graceful: bool = False, timeout: float = 2.0) -> m.Farewell:
        reply = self._call("Leave", pb.LeaveRequest(node_id=node_id, graceful=graceful), timeout)
        return m.Farewell(reply.migrated_sessions, reply.detail)

    def store_checkpoint(self, checkpoint: m.Checkpoint, blob: bytes, timeout: float = 300.0) -> bool:
        """Hand a KV checkpoint in; False when the coordinator needs a full state next (it lacks the base)."""
        return not self._call("StoreCheckpoint", cv.checkpoint_pieces(checkpoint, blob), timeout).need_full

    def fetch(self, shard_id: str, offset: int, timeout: float = 1800.0) -> Streamed:
        """A shard file's chunks from `offset` on."""
        try:
            call = self._stub.FetchShard(pb.FetchShardRequest(shard_id=shard_id, offset=offset), timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc(e, self._where) from None
        return Streamed(call, cv.chunk_of, self._where)

    # ------------------------------------------------------------ for clients

    def generate(self, request: m.GenerateRequest) -> Streamed:
        """The session's events: Started, then Pieces, then Done."""
        return Streamed(self._stub.Generate(cc.generate_pb(request)), cc.event_of, self._where)

    def status(self, timeout: float = 10.0) -> dict:
        """The swarm's status as a plain dict (what `swarm status --json` prints)."""
        return cc.status_dict(self._call("Status", pb.StatusRequest(), timeout))

    def close(self) -> None:
        self._channel.close()
