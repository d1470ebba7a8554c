"""What a shard keeps of the outputs it sent onward, so that a replacement of the next node can be rebuilt.

For each session: the steps (start position, token ids, hidden-state bytes) in the order they were sent,
from the next hop's last checkpoint on. Sending them again one by one reproduces the original batch
composition, which is what makes a rebuilt KV cache bit-identical (see docs/fault-tolerance.md).
"""

from __future__ import annotations

import threading
from collections import deque

from ..errors import KVStateError
from ..messages import KeptStep

# A session whose kept outputs outgrow this (its next hop never checkpointed: the coordinator is
# unreachable) loses its oldest steps; recovering that hop then recomputes from the tokens instead.
SESSION_BUDGET = 256 << 20


class OutputLog:
    """Kept outputs of every session of one shard; thread-safe."""

    def __init__(self, session_budget: int = SESSION_BUDGET):
        self._budget = session_budget
        self._lock = threading.Lock()
        self._steps: dict[str, deque[KeptStep]] = {}
        self._bytes: dict[str, int] = {}
        self._first: dict[str, int] = {}  # the position from which this session's log is complete

    def add(self, session: str, step: KeptStep, keep_from: int) -> None:
        """Record a step sent onward; steps before `keep_from` (the next hop's checkpoint) are let go."""
        with self._lock:
            steps = self._steps.setdefault(session, deque())
            self._first.setdefault(session, 0)
            while steps and steps[-1].end > step.start:  # a step sent again after a rewind replaces the old
                self._bytes[session] -= len(steps.pop().hidden)
            steps.append(step)
            self._bytes[session] = self._bytes.get(session, 0) + len(step.hidden)
            self._trim(session, keep_from)
            while self._bytes[session] > self._budget and len(steps) > 1:
                old = steps.popleft()
                self._bytes[session] -= len(old.hidden)
                self._first[session] = steps[0].start

    def _trim(self, session: str, keep_from: int) -> None:
        steps = self._steps[session]
        while steps and steps[0].start < keep_from:
            self._bytes[session] -= len(steps.popleft().hidden)
        self._first[session] = max(self._first[session], min(keep_from, steps[0].start if steps else keep_from))

    def truncate(self, session: str, length: int) -> None:
        """Forget steps at or after `length` (the session was rewound)."""
        with self._lock:
            steps = self._steps.get(session)
            while steps and steps[-1].start >= length:
                self._bytes[session] -= len(steps.pop().hidden)

    def steps(self, session: str, start: int, end: int) -> list[KeptStep]:
        """The kept steps covering positions start..end-1 exactly; KVStateError when some are gone."""
        with self._lock:
            kept = [s for s in self._steps.get(session, ()) if start <= s.start < end]
            first = self._first.get(session, 0)
        at = start
        for s in kept:
            if s.start != at:
                break
            at = s.end
        if at != end or start < first:
            raise KVStateError(
                f"the outputs kept for session {session!r} cover positions {first} on, contiguous up to {at}; "
                f"positions {start}:{end} are needed; the session must be recomputed from its tokens"
            )
        return kept

    def replace(self, session: str, steps: list[KeptStep], first: int) -> None:
        """Take over another node's kept steps for `session` (a migration), complete from `first` on."""
        with self._lock:
            self._steps[session] = deque(steps)
            self._bytes[session] = sum(len(s.hidden) for s in steps)
            self._first[session] = first

    def all(self, session: str) -> tuple[list[KeptStep], int]:
        """Every kept step of `session`, and the position from which they are complete."""
        with self._lock:
            return list(self._steps.get(session, ())), self._first.get(session, 0)

    def drop(self, session: str) -> None:
        with self._lock:
            self._steps.pop(session, None)
            self._bytes.pop(session, None)
            self._first.pop(session, None)

    def nbytes(self, session: str | None = None) -> int:
        with self._lock:
            return self._bytes.get(session, 0) if session is not None else sum(self._bytes.values())
