"""One step of a session along its route, as the coordinator sends it, and what it learns from the reply.

A step is a chain of nested requests along the route (the coordinator's own hop, if first, runs it in
process); the final shard samples and the token comes back. Each step tells every hop whether to
checkpoint and from which position to keep its outputs (the next hop's newest checkpoint), and each
reply says how long every hop computed, which decides when the next checkpoint is due.
"""

from __future__ import annotations

import logging
from typing import Callable

from .. import failover
from .. import messages as m
from ..errors import CancelledError, PeerError, SwarmError
from .peers import Peers, RouteHop
from .sessions import Session

log = logging.getLogger(__name__)

KEEP_NOTHING = (1 << 32) - 1  # keep_from beyond any position: a node keeps no outputs


class PendingStep:
    """One step on its way: the first hop's answer to wait for (the local node's or the step stream's)."""

    def __init__(self, call, session: Session, remote: bool):
        self._call, self._session, self._remote = call, session, remote

    def cancel(self) -> None:
        self._call.cancel()

    def result(self) -> m.StepResult:
        session = self._session
        try:
            return self._call.result()
        except CancelledError:
            raise PeerError(f"step stopped: {session.interrupted or 'cancelled'}") from None
        finally:
            if self._remote:
                with session.lock:
                    session.inflight = None


class Stepper:
    """Builds, sends and accounts for the steps of sessions; `failover` says whether hops keep what a
    recovery needs, `replay_budget_s` how much compute a hop may run between checkpoints."""

    def __init__(self, peers: Peers, failover_enabled: bool, replay_budget_s: float,
                 guarded: Callable[[], frozenset] = frozenset):
        self.peers = peers
        self.failover_enabled = failover_enabled
        self.replay_budget_s = replay_budget_s
        self._guarded = guarded  # the ranges a standby stands by for (checkpointed more often)

    def message(self, session: Session, tokens: list[int], start: int, sample: bool) -> m.Step:
        """The step: the route, which hops checkpoint, and what each keeps for the next hop."""
        route = session.route
        with session.lock:
            flags = [h.layers in session.pending for h in route]
        # What each hop keeps for the next: from that one's newest checkpoint; nothing for the coordinator's
        # own hop (it never needs rebuilding) or with failover off.
        keep = [session.kept_from(route[i + 1].layers)
                if i + 1 < len(route) and self.failover_enabled and not route[i + 1].is_self else KEEP_NOTHING
                for i in range(len(route))]
        hops = tuple(h.as_hop(f, k) for h, f, k in zip(route[1:], flags[1:], keep[1:]))
        return m.Step(session.sid, start, tuple(tokens), route[0].layers, next=hops, sample=sample,
                      checkpoint=flags[0], keep_from=keep[0], epoch=session.epoch)

    def start(self, session: Session, tokens: list[int], start: int, sample: bool) -> PendingStep:
        """Send one step along the session's route (the coordinator's own hop runs it first); the step's
        `result()` raises PeerError when a node fails or a watcher stops it."""
        step = self.message(session, tokens, start, sample)
        first = session.route[0]
        call = self.peers.of(first).start_step(step)
        if first.is_self:
            return PendingStep(call, session, False)
        with session.lock:
            session.inflight = call
        pending = PendingStep(call, session, True)
        if session.interrupted:  # a watcher stopped the step before it was in flight: it is stopped now too
            pending.cancel()
        return pending

    def run(self, session: Session, tokens: list[int], start: int, sample: bool) -> m.StepResult:
        return self.start(session, tokens, start, sample).result()

    def note_compute(self, session: Session, result: m.StepResult) -> None:
        """Count each hop's compute since its last checkpoint; ask for one when a rebuild would cost too much."""
        asked = session.take_pending()
        guarded = self._guarded()
        for timing in result.timings:
            layers = timing.layers
            # With a standby there is no load to wait for: a replay's own cost per step counts too.
            cost = timing.compute_ms / 1e3 + (failover.REPLAY_STEP_S if layers in guarded else 0.0)
            # A hop asked for a checkpoint exported it after this step's compute: nothing to replay since.
            session.since[layers] = 0.0 if layers in asked else session.since.get(layers, 0.0) + cost
        standby_budget = min(self.replay_budget_s, failover.STANDBY_REPLAY_BUDGET_S)
        due = [h.layers for h in session.route if self.failover_enabled and not h.is_self
               and failover.should_checkpoint(session.since.get(h.layers, 0.0),
                                              standby_budget if h.layers in guarded else self.replay_budget_s)]
        if due:
            session.ask_checkpoint(*due)

    def open(self, session: Session, hop: RouteHop, history=()) -> None:
        """Open the session on one hop (anew), with the sampler's history on the final shard."""
        keep = max(256, session.sampling.repeat_last_n)
        self.peers.of(hop).open_session(m.OpenSession(session.sid, hop.layers, session.sampling,
                                                      tuple(list(history)[-keep:]), session.epoch))

    def close_everywhere(self, session: Session) -> None:
        for hop in session.route:
            try:
                self.peers.of(hop).close_session(session.sid)
            except SwarmError as e:
                log.debug("closing session %s on %s: %s", session.sid, hop.address, e)


def add_timings(totals: dict, result: m.StepResult, wall_s: float) -> None:
    """Split one step's wall time into compute, serialisation, sampling and the rest (network)."""
    hops = result.timings
    compute = sum(h.compute_ms for h in hops)
    codec = sum(h.codec_ms for h in hops)
    sample = sum(h.sample_ms for h in hops)
    totals["steps"] += 1
    totals["compute_ms"] += compute
    totals["serialization_ms"] += codec
    totals["sampling_ms"] += sample
    totals["network_ms"] += max(0.0, 1e3 * wall_s - compute - codec - sample)
