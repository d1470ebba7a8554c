"""swarm: pool several machines to run one llama.cpp model cut into layer-range shards."""

import os as _os

__version__ = "0.1.0"

# gRPC logs every refused TLS handshake (a peer with another key, a port scan) at INFO on stderr; the
# swarm reports refusals itself. Set before gRPC's core starts; an explicit GRPC_VERBOSITY wins.
_os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from .errors import (  # noqa: E402
    BadInputError,
    ContextFullError,
    EngineError,
    KVStateError,
    ModelFileError,
    ShardRangeError,
    SwarmError,
    UnsupportedModelError,
)
from .layers import LayerRange, ShardRole  # noqa: E402

__all__ = [
    "BadInputError", "ContextFullError", "EngineError", "KVStateError", "ModelFileError",
    "ShardRangeError", "SwarmError", "UnsupportedModelError", "LayerRange", "ShardRole",
]
