"""The KV checkpoints the coordinator keeps for each session's recovery, and their counts.

A hop's first checkpoint of a session is its whole state; later ones are deltas on top of the one
before, kept as a chain and put together (`engine.join_kv`) only when a rebuild needs the state or a
chain grows past MAX_LINKS (docs/fault-tolerance.md).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from .. import messages as m
from ..engine import join_kv, kv_header
from ..errors import BadInputError
from ..layers import LayerRange

# Longer chains are put together into one full state when the next delta comes (bounds the work of a
# recovery and what a chain holds that is no longer needed).
MAX_LINKS = 32


@dataclass(frozen=True)
class Checkpoint:
    """A hop's KV state at `positions`: a full state, or what changed since `parent` (a delta)."""

    positions: int
    lineage: str = ""
    blob: bytes = b""
    parent: "Checkpoint | None" = None
    links: int = 0  # deltas between this one and its full state

    def state(self) -> bytes:
        """The full state, put together from the chain (checksums verified); b'' for no checkpoint."""
        chain, c = [], self
        while c is not None:
            chain.append(c.blob)
            c = c.parent
        return join_kv(chain[::-1]) if self.blob else b""


NO_CHECKPOINT = Checkpoint(0)


class SessionCheckpoints:
    """One session's newest checkpoints of each hop's range; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[LayerRange, list[Checkpoint]] = {}

    def newest(self, layers: LayerRange, upto: int) -> Checkpoint:
        """The newest checkpoint of `layers` at `upto` positions or fewer (an empty one if none)."""
        with self._lock:
            return max((c for c in self._held.get(layers, ()) if c.positions <= upto), default=NO_CHECKPOINT,
                       key=lambda c: c.positions)

    def parent(self, layers: LayerRange, positions: int, lineage: str) -> Checkpoint | None:
        """The checkpoint a delta of that base and chain builds on, if still held."""
        with self._lock:
            return next((c for c in self._held.get(layers, ()) if c.positions == positions and c.lineage == lineage),
                        None)

    def keep(self, layers: LayerRange, new: Checkpoint, confirmed: int) -> None:
        """Hold `new`, with the newest checkpoint of a completed step (at `confirmed` or before) and any newer."""
        with self._lock:
            held = [c for c in self._held.get(layers, []) if c.positions >= confirmed and c.positions != new.positions]
            self._held[layers] = sorted(held + [new], key=lambda c: c.positions)[-3:]

    def nbytes(self) -> int:
        """What the checkpoints take, each piece of a chain counted once."""
        seen: dict[int, int] = {}
        with self._lock:
            for cs in self._held.values():
                for c in cs:
                    while c is not None and id(c) not in seen:
                        seen[id(c)] = len(c.blob)
                        c = c.parent
        return sum(seen.values())

    def clear(self) -> None:
        with self._lock:
            self._held.clear()


class CheckpointDesk:
    """Takes the checkpoints nodes hand in: checks each against its session and keeps it there.

    `find(session_id)` gives the running session (`sessions.Session`) or None; `shard_id(layers)` the
    shard file cut for a range; `on_kept(session, layers, checkpoint)` hears of each one kept (standbys)."""

    def __init__(self, find: Callable, shard_id: Callable[[LayerRange], str | None], n_batch: int,
                 on_kept: Callable | None = None):
        self._find, self._shard_id, self._n_batch = find, shard_id, n_batch
        self._on_kept = on_kept
        self._lock = threading.Lock()
        self._counts = {k: 0 for k in ("full", "deltas", "full_bytes", "delta_bytes", "refused")}

    def counts(self) -> m.CheckpointCounts:
        with self._lock:
            return m.CheckpointCounts(**self._counts)

    def _count(self, **add: int) -> None:
        with self._lock:
            for k, v in add.items():
                self._counts[k] += v

    def store(self, checkpoint: m.Checkpoint, blob: bytes) -> bool:
        """Keep a hop's checkpoint with its session; freed when the session ends. A delta is kept on top of
        the checkpoint it was taken against; False when that one is gone (the node sends a full state next)."""
        layers, positions = checkpoint.layers, checkpoint.positions
        session = self._find(checkpoint.session)
        if session is None or all(h.layers != layers for h in session.route):
            return True  # the session ended or moved on
        held = session.checkpoints
        # Checked before it counts: a wrong one would let the previous hop drop what a rebuild needs.
        # (A full state's checksum is verified when it is used; a delta is small, so it is checked now.)
        head = kv_header(blob)
        delta = "base" in head
        if delta:
            head = kv_header(blob, verify=True)
        if head["n_past"] != positions or head["shard_id"] != self._shard_id(layers) or (
                positions > session.positions + self._n_batch) or (delta and not 0 <= head["base"] <= positions):
            raise BadInputError(f"checkpoint of layers {layers} does not match session {checkpoint.session!r}")
        parent = None
        if delta:
            parent = held.parent(layers, head["base"], head["lineage"])
            if parent is None:
                self._count(refused=1)
                session.ask_checkpoint(layers)  # the whole state comes with the next step
                return False
            self._count(deltas=1, delta_bytes=len(blob))
        else:
            self._count(full=1, full_bytes=len(blob))
        new = offered = Checkpoint(positions, head["lineage"], blob, parent, parent.links + 1 if parent else 0)
        if new.links > MAX_LINKS:  # put the chain together
            full = new.state()
            new = Checkpoint(positions, kv_header(full)["lineage"], full)
        held.keep(layers, new, session.kept_from(layers))
        if self._on_kept is not None:  # (as it came: a standby holding the chain takes the delta)
            self._on_kept(session, layers, offered)
        return True
