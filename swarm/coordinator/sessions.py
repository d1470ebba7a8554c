"""Sessions: the state of each running generation, and the slots that bound how many run at once.

A session's own thread (generation.py) drives it and is the only one that moves it on (positions,
tokens, route, attempt); other threads only interrupt it (a node on its route is gone), hand in its
checkpoints, or read it for `swarm status`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .. import messages as m
from ..errors import NotReadyError
from ..layers import LayerRange
from ..sampling import SamplingParams
from .checkpoints import SessionCheckpoints
from .peers import RouteHop

Route = tuple[RouteHop, ...]


@dataclass
class Session:
    sid: str
    route: Route
    sampling: SamplingParams = field(default_factory=SamplingParams)
    started: float = field(default_factory=time.monotonic)
    positions: int = 0
    generated: int = 0
    tokens: list[int] = field(default_factory=list)  # every position fed so far (prompt, then each token)
    prompt_len: int = 0
    epoch: int = 0  # raised by every recovery; nodes refuse steps of older attempts
    # Recovery state: the newest KV checkpoints of each hop, and per hop the compute since its last one,
    # in seconds; hops to ask for one with the next step.
    checkpoints: SessionCheckpoints = field(default_factory=SessionCheckpoints)
    since: dict[LayerRange, float] = field(default_factory=dict)
    pending: set[LayerRange] = field(default_factory=set)
    inflight: object = None  # the step on its way, while it waits on a remote first hop
    interrupted: str = ""  # why a watcher stopped the step in flight
    lock: threading.Lock = field(default_factory=threading.Lock)

    def kept_from(self, layers: LayerRange) -> int:
        """Where the previous hop may let go of what it kept: the newest checkpoint of a step that completed
        (one taken by a step that then failed further on must not count)."""
        return self.checkpoints.newest(layers, self.positions).positions

    def ask_checkpoint(self, *layers: LayerRange) -> None:
        """Have these hops hand in a checkpoint with the next step."""
        with self.lock:
            self.pending.update(layers)

    def take_pending(self) -> set[LayerRange]:
        with self.lock:
            asked, self.pending = self.pending, set()
            return asked

    def uses(self, node_id: str) -> bool:
        return any(h.node_id == node_id for h in self.route)

    def interrupt(self, why: str, cancel_local: Callable[[str], None]) -> None:
        """Stop waiting for the step in flight (a node on the route is gone); `cancel_local` stops the
        coordinator's own hop waiting on the next one."""
        with self.lock:
            self.interrupted = why or self.interrupted
            inflight = self.inflight
        if inflight is not None:
            inflight.cancel()
        elif self.route and self.route[0].is_self:
            cancel_local(self.sid)

    def report(self, now: float) -> m.SessionReport:
        return m.SessionReport(self.sid, self.positions, self.generated, now - self.started, self.checkpoints.nbytes())


class Sessions:
    """The running sessions and their slots; thread-safe. `on_end()` hears when one ends."""

    def __init__(self, max_sessions: int, on_end: Callable[[], None]):
        self.max_sessions = max_sessions
        self._slots = threading.Semaphore(max_sessions)
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._waiting = 0
        self._on_end = on_end

    @contextlib.contextmanager
    def slot(self, wait_s: float, is_active: Callable[[], bool]) -> Iterator[None]:
        """Hold one of `max_sessions` slots for the block, waiting up to `wait_s` for one."""
        deadline = time.monotonic() + wait_s
        with self._lock:
            # Each waiting request holds a server thread; a bounded queue keeps heartbeats served.
            if self._waiting >= 2 * self.max_sessions:
                raise NotReadyError(f"the swarm is busy ({self.max_sessions} sessions running, more waiting); "
                                    "try again shortly")
            self._waiting += 1
        try:
            while not self._slots.acquire(timeout=0.5):
                if time.monotonic() > deadline or not is_active():
                    raise NotReadyError(f"all {self.max_sessions} session slots are busy; try again shortly")
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    def add(self, session: Session) -> Session:
        with self._lock:
            self._sessions[session.sid] = session
        return session

    def remove(self, sid: str) -> None:
        with self._lock:
            self._sessions.pop(sid, None)
        self._on_end()

    def get(self, sid: str) -> Session | None:
        with self._lock:
            return self._sessions.get(sid)

    def all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def busy(self) -> bool:
        with self._lock:
            return bool(self._sessions)

    def using(self, node_id: str) -> list[Session]:
        return [s for s in self.all() if s.uses(node_id)]
