"""The exception tree every swarm module raises.

    SwarmError                     base; catch this to handle any swarm failure
    ├── ModelFileError             a GGUF file is missing, truncated, corrupt or not a model
    ├── UnsupportedModelError      the slicer does not know this architecture's per-layer rules
    ├── ShardRangeError            a layer range that does not fit the model
    ├── BadInputError              a request the engine refuses before it reaches llama.cpp
    │   └── ContextFullError       more sessions or positions than the context holds
    ├── KVStateError               a KV blob that does not belong to this shard, or is damaged
    ├── EngineError                llama.cpp itself reported a failure
    ├── AuthError                  a peer refused the swarm key (UNAUTHENTICATED)
    ├── NotReadyError              the swarm cannot serve yet: layers unplaced, shards loading
    └── PeerError                  a peer could not be reached or failed while serving a call
        ├── UnreachableError       nothing answers at the peer's address (refused, reset, unreachable)
        ├── CancelledError         a call this side (or its caller) stopped waiting for
        └── CapacityError          a lost range that no live node has the memory to take

Messages say what went wrong and what to do about it.
"""

from __future__ import annotations


class SwarmError(Exception):
    """Base class of every error raised by the swarm."""


class ModelFileError(SwarmError):
    """A model or shard file that cannot be used."""


class UnsupportedModelError(SwarmError):
    """A model whose architecture the slicer cannot cut exactly."""


class ShardRangeError(SwarmError, ValueError):
    """A layer range outside the model or empty."""


class BadInputError(SwarmError, ValueError):
    """Input refused before it reaches llama.cpp: wrong shape, dtype, token id or position."""


class ContextFullError(BadInputError):
    """More sessions or tokens than the shard's context was created for."""


class KVStateError(SwarmError, ValueError):
    """A KV-state blob from another shard, or a damaged one."""


class EngineError(SwarmError, RuntimeError):
    """llama.cpp returned an error code."""


class AuthError(SwarmError):
    """A peer refused this swarm key, or none was given."""


class NotReadyError(SwarmError):
    """The swarm cannot serve the request yet (waiting for nodes, shards loading)."""


class PeerError(SwarmError):
    """A peer was unreachable, timed out, or failed while serving a call."""


class UnreachableError(PeerError):
    """Nothing answers at a peer's address (UNAVAILABLE), as opposed to a peer that is slow to answer."""


class CancelledError(PeerError):
    """A step this side stopped waiting for: cancelled here, or by the caller it was serving."""


class CapacityError(PeerError):
    """A node is gone and no live node has the memory for its range: the session cannot go on."""
