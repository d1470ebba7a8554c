"""The wire: everything that crosses the network, and the only place protobuf appears.

    dialout.py         a relayed node dialling out through the relay (HTTP CONNECT)
    tls.py             mutual TLS: the certificate authority the swarm key stands for, credentials
    channels.py        gRPC channels and servers over mutual TLS
    codes.py           swarm errors <-> gRPC status codes, once at each end
    convert.py         protobuf <-> the project's types (`messages.py`) for nodes
    convert_client.py  the same for clients: generation and status
    steps.py           the step stream: pipeline steps over TCP connections kept open
    nodes.py           a node over the network (`RemoteNode`), as the coordinator and peers hold it
    coordinator.py     the coordinator over the network (`CoordinatorLink`), for nodes and clients
    servicers.py       the thin gRPC services in front of a node and a coordinator
    relay.py           reverse connections through a relay, for nodes that accept no inbound connection

Everything above the wire speaks `messages.py`, LayerRange and SamplingParams.
"""

from . import dialout, tls
from .channels import MAX_MESSAGE, channel, check_address, new_key, server, split_address
from .codes import from_rpc, status_for
from .convert import KV_PIECE
from .coordinator import CoordinatorLink
from .nodes import NodeRegistry, RemoteNode
from .relay import Relay
from .relay_client import RelayClient
from .servicers import CoordinatorServicer, NodeServicer
from .steps import StepContext, StepLinks, StepServer

__all__ = [
    "dialout", "tls", "MAX_MESSAGE", "KV_PIECE", "channel", "check_address", "new_key", "server", "split_address", "from_rpc",
    "status_for", "CoordinatorLink", "NodeRegistry", "RemoteNode", "CoordinatorServicer", "NodeServicer",
    "StepContext", "StepLinks", "StepServer", "Relay", "RelayClient",
]
