"""A node over the network, as Python methods that speak the project's types (`messages.py`).

`RemoteNode` is what the coordinator (and a node handing a session over) holds for another node: its
gRPC `Node` service and its step stream. Every failed call raises the swarm error it stands for, naming
the node; a call that times out or finds nobody raises PeerError.
"""

from __future__ import annotations

import threading

import grpc

from .. import messages as m
from .._proto import swarm_pb2 as pb
from .._proto import swarm_pb2_grpc as pbg
from . import convert as cv
from .channels import channel, check_address
from .codes import from_rpc
from .steps import StepCall, StepLinks

CALL_TIMEOUT_S = 120.0  # one step of a big prompt on a slow machine; a dead peer fails far sooner


class RemoteNode:
    """One node's gRPC service; `steps` (the step links of whoever holds this) carries its pipeline steps."""

    def __init__(self, address: str, key: str, steps_address: str = "", links: StepLinks | None = None,
                 name: str = ""):
        self.address = check_address(address)
        self.steps_address = steps_address
        self._links = links
        self._where = name or f"node at {address}"
        self._channel = channel(self.address, key)
        self._stub = pbg.NodeStub(self._channel)

    def _call(self, method: str, request, timeout: float = CALL_TIMEOUT_S):
        try:
            return getattr(self._stub, method)(request, timeout=timeout)
        except grpc.RpcError as e:
            raise from_rpc(e, self._where) from None

    # ------------------------------------------------------------ assignment and measurement

    def load(self, order: m.Load, timeout: float) -> m.Loaded:
        reply = self._call("Assign", cv.load_pb(order), timeout)
        return m.Loaded(reply.fetched, reply.load_s)

    def probe(self, order: m.ProbeOrder, timeout: float) -> m.ProbeResult:
        return cv.probe_result_of(self._call("Probe", cv.probe_pb(order), timeout))

    def ping(self, payload: bytes = b"", reply_bytes: int = 0, timeout: float = 10.0) -> None:
        self._call("Ping", pb.PingRequest(payload=payload, reply_bytes=reply_bytes), timeout)

    def measure_link(self, to: str, payload_bytes: int, count: int, timeout: float = 60.0) -> m.Link:
        """The link from this node to the node at `to`, as this node measures it."""
        reply = self._call("MeasureLink", pb.LinkRequest(address=to, payload_bytes=payload_bytes, count=count),
                           timeout)
        return m.Link(reply.rtt_s, reply.bandwidth_bps)

    # ------------------------------------------------------------ sessions

    def open_session(self, order: m.OpenSession) -> None:
        self._call("OpenSession", cv.open_pb(order))

    def close_session(self, session: str, timeout: float = 5.0) -> None:
        self._call("CloseSession", pb.CloseSessionRequest(session_id=session), timeout)

    def start_step(self, step: m.Step, timeout: float = CALL_TIMEOUT_S, caller=None) -> StepCall:
        """Send a step over the step stream; `result()` of the answer waits for the rest of the route."""
        return self._links.call(self.steps_address, step, timeout, caller=caller, where=self._where)

    def replay(self, step: m.Step) -> m.StepResult:
        """Run a replay step (a gRPC call: replays are rare and may be large)."""
        return cv.step_result_of(self._call("Forward", cv.step_pb(step)))

    def rewind(self, order: m.Rewind) -> int:
        return int(self._call("Rewind", cv.rewind_pb(order)).positions)

    def import_state(self, state: m.ImportState, blob: bytes) -> int:
        """Load a session's KV state and kept outputs; the positions it holds then."""
        return int(self._call("ImportKV", cv.import_pieces(state, blob)).positions)

    def resend(self, order: m.Resend) -> None:
        self._call("Resend", cv.resend_pb(order))

    def handoff(self, order: m.Handoff) -> None:
        self._call("Handoff", cv.handoff_pb(order))

    def close(self) -> None:
        self._channel.close()


class NodeRegistry:
    """The RemoteNodes one process holds, by address, with the step links they share."""

    def __init__(self, key: str, links: StepLinks | None = None):
        self._key = key
        self.links = links or StepLinks(key)
        self._nodes: dict[str, RemoteNode] = {}
        self._lock = threading.Lock()

    def get(self, address: str, steps_address: str = "", name: str = "") -> RemoteNode:
        with self._lock:
            node = self._nodes.get(address)
            if node is None or (steps_address and node.steps_address != steps_address):
                if node is not None:
                    node.close()
                node = self._nodes[address] = RemoteNode(address, self._key, steps_address, self.links, name)
            return node

    def transient(self, address: str) -> RemoteNode:
        """A RemoteNode of its own (not pooled) for a one-off exchange; the caller closes it."""
        return RemoteNode(address, self._key, name=f"node at {address}")

    def forget(self, address: str, steps_address: str = "") -> None:
        """Drop the channel and the idle step connections to a node that left or failed."""
        if steps_address:
            self.links.forget(steps_address)
        with self._lock:
            node = self._nodes.pop(address, None)
        if node is not None:
            node.close()

    def close(self) -> None:
        with self._lock:
            nodes, self._nodes = list(self._nodes.values()), {}
        for node in nodes:
            node.close()
        self.links.close()
