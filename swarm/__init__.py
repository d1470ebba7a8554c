"""swarm: pool several machines to run one llama.cpp model cut into layer-range shards."""

__version__ = "0.1.0"

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
