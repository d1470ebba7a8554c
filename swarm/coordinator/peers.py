"""How the coordinator reaches each node: its own node in process, every other one over the wire.

Both answer the same methods (`open_session`, `start_step`, `replay`, `rewind`, `import_state`,
`resend`, `handoff`, `close_session`, `load`, `probe`) with the same types and swarm errors, so the
rooms above never ask which kind of node a hop is, except to skip work the coordinator's own hop
never needs (it is never rebuilt: if the coordinator fails, the swarm stops).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import messages as m
from ..layers import LayerRange
from ..node import Node
from ..wire import NodeRegistry, RemoteNode

ASSIGN_TIMEOUT_S = 1800.0  # fetching a multi-GB shard over Wi-Fi takes a while


@dataclass(frozen=True)
class RouteHop:
    """One hop of a route: a node and the range it runs for the route."""

    node_id: str
    address: str
    layers: LayerRange
    is_self: bool
    steps: str = ""  # where the hop takes pipeline steps (its step stream)

    def as_hop(self, checkpoint: bool = False, keep_from: int = 0) -> m.Hop:
        return m.Hop(self.address, self.layers, self.steps, checkpoint, keep_from)


class _Local:
    """The coordinator's own node with the remote nodes' call signatures."""

    def __init__(self, node: Node):
        self.node = node

    def load(self, order: m.Load, timeout: float = 0.0) -> m.Loaded:
        return self.node.load(order)

    def probe(self, order: m.ProbeOrder, timeout: float = 0.0) -> m.ProbeResult:
        return self.node.probe(order)

    def close_session(self, session: str, timeout: float = 0.0) -> None:
        self.node.close_session(session)

    def start_step(self, step: m.Step, timeout: float = 0.0, caller=None):
        return self.node.start_step(step, caller)

    def __getattr__(self, name):  # open_session, replay, rewind, import_state, resend, handoff, cancel
        return getattr(self.node, name)


class Peers:
    """The coordinator's handles on the nodes, by hop or member."""

    def __init__(self, local: Node, registry: NodeRegistry):
        self.local = _Local(local)
        self.registry = registry

    def of(self, hop) -> _Local | RemoteNode:
        """The node of a route hop or a member (anything with is_self, address and steps)."""
        if hop.is_self:
            return self.local
        return self.registry.get(hop.address, hop.steps)

    def remote(self, member) -> RemoteNode:
        return self.registry.get(member.address, member.steps, f"node {member.name} ({member.address})")

    def load(self, member, order: m.Load) -> m.Loaded:
        return (self.local if member.is_self else self.remote(member)).load(order, ASSIGN_TIMEOUT_S)

    def forget(self, member) -> None:
        """Drop the connections to a node that left or failed."""
        if not member.is_self:
            self.registry.forget(member.address, member.steps)

    def close(self) -> None:
        self.registry.close()
