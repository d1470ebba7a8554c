"""What a standby holds of the sessions of the range it stands by for: each session's newest checkpoint,
as the bytes it came in (a whole state and the deltas taken after it), imported into llama.cpp only when
the standby takes the range over.

Keeping a replica current then costs the standby a few kilobytes per checkpoint (a delta: the cells of
the positions decoded since the one before) and no CPU to speak of; the whole state is put together
(`join_kv`) and imported once, at the takeover, from memory on this machine. See
docs/fault-tolerance.md, "Standbys".
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

from ..engine import join_kv, kv_header
from ..errors import KVStateError

MAX_LINKS = 64  # a longer chain is put together into one whole state when the next delta comes


@dataclass
class _Chain:
    lineage: str
    positions: int
    blobs: list = field(default_factory=list)  # a whole state, then deltas in order


class HeldStates:
    """Per session, the chain of KV blobs a standby holds for one shard, for at most `max_sessions`
    sessions; thread-safe. `check(head)` refuses (KVStateError) a blob header another shard or layout
    wrote."""

    def __init__(self, check: Callable[[dict], None], max_sessions: int):
        self._check = check
        self._max = max_sessions
        self._lock = threading.Lock()
        self._chains: dict[str, _Chain] = {}

    def hold(self, session: str, blob: bytes) -> int:
        """Keep `blob` (checksum verified): a whole state replaces what the session held, a delta must build
        on the newest state held. The positions held then."""
        head = kv_header(blob, verify=True)
        self._check(head)
        blob = bytes(blob)
        with self._lock:
            chain = self._chains.get(session)
            if chain is None and len(self._chains) >= self._max:
                raise KVStateError(f"this standby already holds {len(self._chains)} sessions, its most; close "
                                   "sessions that ended first")
            if "base" not in head:
                self._chains[session] = _Chain(head["lineage"], head["n_past"], [blob])
                return head["n_past"]
            if chain is None or (chain.positions, chain.lineage) != (head["base"], head["lineage"]):
                have = f"{chain.positions} positions of chain {chain.lineage}" if chain else "nothing of it"
                raise KVStateError(f"this KV delta builds on {head['base']} positions of chain {head['lineage']}, "
                                   f"but this node holds {have}; send the whole state")
            blobs = chain.blobs + [blob]
            if len(blobs) > MAX_LINKS:
                blobs = [join_kv(blobs)]  # (before anything changes: a chain that does not join stays as it was)
            chain.blobs, chain.positions = blobs, head["n_past"]
            return chain.positions

    def holds(self, session: str) -> tuple[int, str]:
        """(positions, lineage) of what is held of `session`; (0, '') for nothing."""
        with self._lock:
            chain = self._chains.get(session)
            return (chain.positions, chain.lineage) if chain else (0, "")

    def whole(self, session: str) -> bytes:
        """The whole state held of `session`, put together (it stays held until `drop`)."""
        with self._lock:
            chain = self._chains.get(session)
            blobs = list(chain.blobs) if chain else None
        if blobs is None:
            raise KVStateError(f"this node holds no KV state of session {session!r}; send the whole state")
        return join_kv(blobs)

    def drop(self, session: str) -> None:
        with self._lock:
            self._chains.pop(session, None)

    def nbytes(self) -> int:
        with self._lock:
            return sum(len(b) for c in self._chains.values() for b in c.blobs)
