"""What the coordinator, the nodes and the clients say to each other, as the project's own frozen types.

The rooms of the coordinator and the node speak these; `swarm/wire/` alone turns them into protobuf
and back (`protos/swarm.proto` holds the same fields, with the same meanings). Sizes, positions and
layer ranges here are already checked where they came from the network (`wire.convert`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .layers import LayerRange
from .sampling import SamplingParams


# ---------------------------------------------------------------- machines and shards


@dataclass(frozen=True)
class Device:
    """A device llama.cpp's build can use on a node (its device API)."""

    name: str
    type: str  # cpu, gpu, igpu, accel
    memory_free: int = 0
    memory_total: int = 0


@dataclass(frozen=True)
class Resources:
    """A node's memory (within its cgroup limit), what it gives the swarm, its threads and devices."""

    memory_total: int = 0
    memory_available: int = 0
    max_memory: int = 0  # 0: no cap given
    threads: int = 0
    cpu_count: int = 0
    devices: tuple[Device, ...] = ()

    def usable_memory(self) -> int:
        """What the planner may fill: the cap when given (never more than is free), else 90% of free."""
        if self.max_memory:
            return min(self.max_memory, self.memory_available) if self.memory_available else self.max_memory
        return int(self.memory_available * 0.9)


@dataclass(frozen=True)
class ShardSpec:
    """A shard file the coordinator cut, as a node needs to know it to fetch and check it."""

    shard_id: str
    file_name: str
    size: int
    sha256: str
    layers: LayerRange
    n_layer_total: int
    model_url: str = ""  # the model's public URL, when the coordinator names one: nodes may build the shard from it


@dataclass(frozen=True)
class ShardChunk:
    """A piece of a shard file on its way to a node."""

    offset: int
    data: bytes
    sha256: str  # of `data`
    file_size: int  # of the whole file


@dataclass(frozen=True)
class ContextSettings:
    """How a node creates the llama.cpp context of a shard it loads."""

    n_ctx: int
    max_sessions: int
    n_batch: int


@dataclass(frozen=True)
class Load:
    """Load `shard` (fetching it if needed), beside what the node holds (`extra`) or instead of it;
    `shard` None: drop everything, or only the range `drop`."""

    shard: ShardSpec | None
    settings: ContextSettings | None = None
    extra: bool = False
    drop: LayerRange | None = None


@dataclass(frozen=True)
class Loaded:
    fetched: bool = False  # the file had to be transferred
    load_s: float = 0.0


@dataclass(frozen=True)
class ProbeOrder:
    """Measure compute on these middle slices of the model (cached on the node)."""

    shards: tuple[ShardSpec, ...]
    decode_steps: int = 24
    prefill_tokens: int = 128
    refresh: bool = False


@dataclass(frozen=True)
class ComputeProfile:
    """A node's measured compute: per byte of weights read, and a fixed cost per step; how far the
    measurement can be trusted (profiling.py)."""

    decode_s_per_byte: float
    prefill_s_per_byte: float  # per prompt token in a full batch
    step_overhead_s: float
    head_s_per_byte: float | None = None  # decode cost per byte of the output head; None: not probed
    contention: float | None = None  # share of the probe's CPU time others took while measuring; None: unknown
    measured_at: float = 0.0  # unix time of the measurement


@dataclass(frozen=True)
class ProbeResult:
    profile: ComputeProfile
    cached: bool = False


@dataclass(frozen=True)
class Link:
    """A measured link: round trip with a hidden-state payload, and bandwidth."""

    rtt_s: float
    bandwidth_bps: float


# ---------------------------------------------------------------- membership


@dataclass(frozen=True)
class JoinRequest:
    name: str
    port: int
    step_port: int
    resources: Resources
    host: str = ""  # where peers reach the node; empty: the address the call came from
    pin: LayerRange | None = None
    version: str = ""
    leave_after_s: float = 0.0  # --leave-after: it leaves this many seconds from now (0: no deadline)
    outbound_only: bool = False  # --outbound-only: reach it through the relay even if it looks reachable


@dataclass(frozen=True)
class Welcome:
    node_id: str
    heartbeat_s: float
    model_name: str
    name: str = ""  # the node's name in the swarm (suffixed when another node has its --name)
    relay_host: str = ""  # outbound-only: the relay to keep reverse connections to ("": the coordinator's host)
    relay_port: int = 0  # 0: the node is reachable, no relay
    relay_token: str = ""


@dataclass(frozen=True)
class Farewell:
    """The coordinator's answer to a node that leaves."""

    migrated_sessions: int = 0
    detail: str = ""


# ---------------------------------------------------------------- one pipeline step


@dataclass(frozen=True)
class Hop:
    """One node of a session's route, as the step tells the hop before it."""

    address: str  # its gRPC address
    layers: LayerRange
    steps: str = ""  # HOST:PORT of its step stream, where steps are sent
    checkpoint: bool = False  # after this step, hand the session's KV state to the coordinator
    keep_from: int = 0  # keep the outputs sent onward from this position on


@dataclass(frozen=True)
class Step:
    """One batch of a session through one hop and, from there, the rest of the route."""

    session: str
    start: int  # position of the first row
    tokens: tuple[int, ...]  # every hop gets them; the final shard's sampler uses them
    layers: LayerRange  # the range the receiver must hold
    hidden: bytes = b""  # float32 little-endian, len(tokens) x n_embd (empty for the first shard)
    next: tuple[Hop, ...] = ()
    sample: bool = False
    replay: bool = False  # rebuilding: compute and keep, pass nothing on, sample nothing
    checkpoint: bool = False
    keep_from: int = 0
    epoch: int = 0  # the session's attempt number: older steps are refused

    @property
    def n_positions(self) -> int:
        return len(self.tokens)


@dataclass(frozen=True)
class HopTiming:
    layers: LayerRange
    compute_ms: float = 0.0
    codec_ms: float = 0.0
    sample_ms: float = 0.0
    call_ms: float = 0.0
    handler_ms: float = 0.0


@dataclass(frozen=True)
class StepResult:
    token: int | None = None  # the sampled token, when the step sampled one
    timings: tuple[HopTiming, ...] = ()


# ---------------------------------------------------------------- sessions on a node


@dataclass(frozen=True)
class OpenSession:
    session: str
    layers: LayerRange
    sampling: SamplingParams = field(default_factory=SamplingParams)
    history: tuple[int, ...] = ()  # tokens the session already holds (a successor's sampler needs them)
    epoch: int = 0


@dataclass(frozen=True)
class Rewind:
    session: str
    layers: LayerRange
    length: int
    epoch: int = 0


@dataclass(frozen=True)
class KeptStep:
    """A step's outputs as a hop sent them onward: what rebuilding the next hop replays."""

    start: int
    tokens: tuple[int, ...]
    hidden: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class ImportState:
    """A session's KV state (sent beside this, as bytes) and kept outputs for one shard of a node.
    `mode`: IMPORT_NOW, HOLD (a standby keeps the bytes: a whole state or a delta onto what it holds,
    imported only when it takes over) or HELD (import what the node holds; no bytes sent)."""

    session: str
    layers: LayerRange
    keep_from: int = 0
    epoch: int = 0
    kept: tuple[KeptStep, ...] = ()
    mode: str = ""


IMPORT_NOW, HOLD, HELD = "", "hold", "held"  # ImportState.mode


@dataclass(frozen=True)
class Resend:
    """Send the kept outputs from..to-1 of a session to `to`, one step per original batch."""

    session: str
    layers: LayerRange
    start: int
    end: int
    to: Hop
    epoch: int = 0


@dataclass(frozen=True)
class Handoff:
    """Ship a session's KV state and kept outputs to `to`, which takes this shard over."""

    session: str
    layers: LayerRange
    to: Hop
    epoch: int = 0


@dataclass(frozen=True)
class Checkpoint:
    """A hop's KV state of a session at `positions` (the bytes travel beside it)."""

    session: str
    layers: LayerRange
    positions: int


# ---------------------------------------------------------------- clients


@dataclass(frozen=True)
class GenerateRequest:
    """A completion of `prompt`, or the assistant's reply to `messages` ((role, content) pairs)."""

    prompt: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    max_tokens: int = 0  # 0: the coordinator's default
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    timings: bool = False


@dataclass(frozen=True)
class Started:
    session_id: str
    prompt_tokens: int


@dataclass(frozen=True)
class Piece:
    text: str
    tokens: tuple[int, ...] = ()


@dataclass(frozen=True)
class StepTimings:
    """Decode steps' wall time split into compute, serialisation, sampling and the rest (network)."""

    steps: int = 0
    compute_ms: float = 0.0
    serialization_ms: float = 0.0
    network_ms: float = 0.0
    sampling_ms: float = 0.0


@dataclass(frozen=True)
class Done:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    first_token_ms: float
    decode_tokens_per_s: float
    timings: StepTimings = StepTimings()


GenerateEvent = Started | Piece | Done


# ---------------------------------------------------------------- status


@dataclass(frozen=True)
class NodeReport:
    node_id: str
    name: str
    address: str
    steps: str
    resources: Resources
    state: str  # joining, loading, ready, idle, failed, backoff, leaving
    last_seen_s: float
    is_coordinator: bool
    pinned: bool
    layers: LayerRange | None = None
    extra_layers: tuple[LayerRange, ...] = ()  # taken over from a failed or departed node
    detail: str = ""
    profile: ComputeProfile | None = None
    profile_cached: bool = False
    link: Link | None = None  # to the coordinator
    reason: str = ""  # the planner's word on this node
    outbound_only: bool = False  # reached through the coordinator's relay
    relayed_because: str = ""  # why: it asked (--outbound-only), or the coordinator could not reach it


@dataclass(frozen=True)
class SessionReport:
    session_id: str
    positions: int
    generated: int
    age_s: float
    checkpoint_bytes: int


@dataclass(frozen=True)
class RecoveryReport:
    at_unix: float
    node: str
    address: str
    layers: LayerRange | None
    detection: str
    path: str
    sessions: int
    stall_s: float
    successor: str
    replayed_positions: int
    detail: str


@dataclass(frozen=True)
class StandbyReport:
    """A node holding a loaded replica of a range it does not serve."""

    layers: LayerRange
    node: str  # the standby's name
    guards: str  # the name of the node serving the range
    nbytes: int
    state: str  # loading, ready
    checkpoints: int  # checkpoints it received since it was loaded


@dataclass(frozen=True)
class CheckpointCounts:
    full: int = 0
    deltas: int = 0
    full_bytes: int = 0
    delta_bytes: int = 0
    refused: int = 0


@dataclass(frozen=True)
class StatusReport:
    swarm: str
    model_name: str
    n_layer: int
    state: str  # ready, planning, waiting
    detail: str
    n_ctx: int
    max_sessions: int
    nodes: tuple[NodeReport, ...] = ()
    sessions: tuple[SessionReport, ...] = ()
    predicted_decode_tps: float = 0.0
    measured_decode_tps: float = 0.0
    measured_sessions: int = 0
    recoveries: tuple[RecoveryReport, ...] = ()
    checkpoints: CheckpointCounts = CheckpointCounts()
    chat_template: str = ""  # how chats are rendered: "gguf (jinja)", "llama.cpp built-in NAME" or "none"
    standbys: tuple[StandbyReport, ...] = ()
