"""Failover vocabulary and decisions: who takes a lost range, how often to checkpoint, what is recorded.

Pure functions and plain records; the coordinator does the I/O.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from .errors import BadInputError
from .layers import LayerRange

# A hop is asked for a KV checkpoint once it has computed this much since its last one, so that
# rebuilding it elsewhere replays at most about this much compute (plus the step that passes it).
# Every hop also checkpoints with a prompt's last piece (the coordinator sees to that).
REPLAY_BUDGET_S = 0.3
# A range with a standby is checkpointed more often: with no load to wait for, the replay is the stall.
STANDBY_REPLAY_BUDGET_S = 0.12
# ... and each of its steps counts this much on top of its compute: what replaying a step costs besides
# the compute (the previous node sends it again, one message per step, and the new one takes it in),
# about 3 ms per step on a 2-core machine over localhost; a range that computes little (a 22 MB middle
# shard: 2-3 ms a step) otherwise went 50 steps between checkpoints and replayed them in 150-250 ms.
REPLAY_STEP_S = 0.003
# A node lost this many times within FLAP_WINDOW_S is kept out of plans for a while, doubling each time.
FLAP_LOSSES = 2
FLAP_WINDOW_S = 300.0
FLAP_BACKOFF_S = 30.0


@dataclass(frozen=True)
class Candidate:
    """A live node that could take a lost range."""

    node_id: str
    name: str
    free_bytes: int  # usable memory minus what its current shards need
    has_file: bool  # already holds the lost range's shard file (no transfer)
    step_s: float  # predicted compute per decode step for the lost range
    serves_route: bool  # already hosts a range of the route (no new hop to wake)


def choose_successor(need_bytes: int, candidates: list[Candidate]) -> Candidate | None:
    """The node that should take a lost range of `need_bytes`, or None when none has the memory.

    Nodes that hold the shard file come first (a transfer costs seconds to minutes), then the fastest
    for this range; ties go to a node already on the route, then to the id.
    """
    fits = [c for c in candidates if c.free_bytes >= need_bytes]
    if not fits:
        return None
    return min(fits, key=lambda c: (not c.has_file, round(c.step_s, 4), not c.serves_route, c.node_id))


def should_checkpoint(compute_since_s: float, budget_s: float = REPLAY_BUDGET_S) -> bool:
    """Whether a hop that computed `compute_since_s` since its last checkpoint should hand in another."""
    return compute_since_s >= budget_s


def replay_budget_from_env(environ=os.environ) -> float:
    """REPLAY_BUDGET_S, or SWARM_REPLAY_BUDGET_S (seconds of compute between a hop's checkpoints) if set."""
    text = environ.get("SWARM_REPLAY_BUDGET_S", "")
    if not text:
        return REPLAY_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.001 <= value <= 3600:
        raise BadInputError(f"SWARM_REPLAY_BUDGET_S must be seconds between 0.001 and 3600, got {text!r}")
    return value


def backoff_s(loss_times: list[float], now: float) -> float:
    """How long a node that is back after losses at `loss_times` stays out of plans (0: not flapping)."""
    recent = [t for t in loss_times if now - t <= FLAP_WINDOW_S]
    if len(recent) < FLAP_LOSSES:
        return 0.0
    return FLAP_BACKOFF_S * 2 ** min(len(recent) - FLAP_LOSSES, 5)


# Paths, from cheapest to dearest. STANDBY: a replay on a standby, which needed no load.
MIGRATE, STANDBY, REPLAY, RECOMPUTE, NONE = "migrate", "standby", "replay", "recompute", "none"
_COST = {MIGRATE: 0, STANDBY: 1, REPLAY: 2, RECOMPUTE: 3, NONE: 4}


@dataclass
class Recovery:
    """One failure or departure and what was done about it (shown by `swarm status`)."""

    node: str
    address: str
    layers: tuple[LayerRange, ...]
    detection: str  # "call failed", "missed heartbeats for 2.1 s", "left"
    at_unix: float = field(default_factory=time.time)
    at: float = field(default_factory=time.monotonic)
    path: str = NONE
    sessions: int = 0
    stall_s: float = 0.0
    successor: str = ""
    replayed_positions: int = 0
    detail: str = ""

    def add_session(self, path: str, stall_s: float, replayed: int) -> None:
        """Count one session carried through; the record shows the dearest path any session took."""
        if self.sessions == 0 or _COST[path] > _COST[self.path]:
            self.path = path
        self.sessions += 1
        self.stall_s = max(self.stall_s, stall_s)
        self.replayed_positions += replayed


@dataclass(frozen=True)
class Guarded:
    """A range of the route that a standby could guard."""

    layers: LayerRange
    need_bytes: int  # what a replica takes (the planner's estimate); also what a successor would load
    holder: str  # node id of the node that serves it
    risk: int = 0  # how unreliable the holder is: its recent losses (more: guard it first)
    shard_id: str = ""  # its shard file


@dataclass(frozen=True)
class Spare:
    """A live node that could hold standbys: its memory left after what it serves."""

    node_id: str
    free_bytes: int
    on_route: bool  # serves a range of the route (a standby there shares its memory and cores)
    files: frozenset[str] | None = frozenset()  # shard files it holds (None: every one, the coordinator)
    serves: frozenset[LayerRange] = frozenset()  # ranges it serves now (one it took over, too): no standby of them


def choose_standbys(ranges: list[Guarded], spares: list[Spare], on_route_too: bool = False) -> dict[LayerRange, str]:
    """Which node stands by for which range (range -> node id), within each node's free memory.

    Only nodes off the route stand by unless `on_route_too`: loading a standby takes the cores of the node
    that holds it (a repack of its weights), which a node on the route takes from its steps.

    The ranges a loss would cost most are guarded first: an unreliable holder, then the most bytes to
    load. Each gets a node off the route before one on it, then one that holds the shard file (no transfer),
    then the one with the most room; never its own holder nor a node that serves it already; at most one
    standby per range. Nothing when no node has the memory."""
    for r in ranges:
        if r.need_bytes <= 0:
            raise BadInputError(f"a standby of layers {r.layers} needs a positive size, got {r.need_bytes}")
    free = {s.node_id: s.free_bytes for s in spares if on_route_too or not s.on_route}
    off_route = {s.node_id: not s.on_route for s in spares}
    files = {s.node_id: s.files for s in spares}
    serves = {s.node_id: s.serves for s in spares}
    chosen: dict[LayerRange, str] = {}
    for r in sorted(ranges, key=lambda r: (-r.risk, -r.need_bytes, r.layers.start)):
        fits = [n for n, f in free.items() if n != r.holder and r.layers not in serves[n] and f >= r.need_bytes]
        if r.layers in chosen or not fits:
            continue
        best = min(fits, key=lambda n: (not off_route[n], not (files[n] is None or r.shard_id in files[n]),
                                        -free[n], n))
        chosen[r.layers] = best
        free[best] -= r.need_bytes
    return chosen
