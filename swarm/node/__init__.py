"""A node of the swarm: it holds shards, runs pipeline steps, keeps what a recovery needs, hands sessions over.

`Node` (service.py) is the whole of it as the wire's servicer and the coordinator's own hop see it.
"""

from .service import Node
from .stepping import FORWARD_TIMEOUT_S, Onward

__all__ = ["Node", "Onward", "FORWARD_TIMEOUT_S"]
