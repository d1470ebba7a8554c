"""Recovery: carry a session whose step failed over to live nodes, so it goes on with the same text.

When a node of a running session fails, the session's step is stopped, a live node takes the lost range
(succession.py decides which), and the session's KV cache for that range is rebuilt there from the last
checkpoint plus the outputs the previous hop kept, before the step that failed runs again. When what was
kept does not reach back far enough, every hop runs the session's tokens again (recompute). See
docs/fault-tolerance.md.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

from .. import failover
from .. import messages as m
from ..errors import BadInputError, KVStateError, SwarmError, UnreachableError
from .members import HEARTBEAT_S, Membership
from .peers import Peers, RouteHop
from .planning import Placement
from .sessions import Session
from .standbys import Standbys
from .stepping import Stepper
from .succession import RecoveryLog, Succession

log = logging.getLogger(__name__)

PING_TIMEOUT_S = 0.5  # after a failed step: a live node answers a ping far sooner


class Recovery:
    """Recovers sessions; each call runs on the session's own thread."""

    def __init__(self, members: Membership, placement: Placement, succession: Succession, log_: RecoveryLog,
                 peers: Peers, stepper: Stepper, n_batch: int, standbys: Standbys):
        self._members, self._placement, self._succession, self._log = members, placement, succession, log_
        self._standbys = standbys
        self._peers, self._stepper, self._n_batch = peers, stepper, n_batch
        self.recompute_only = False  # benchmarks: rebuild from the tokens even when kept states would do

    def recover(self, session: Session, start: int, error: str):
        """Carry a session whose step at `start` failed over to live nodes; (records, path, replayed,
        detected at)."""
        detected = time.monotonic()
        with session.lock:
            session.interrupted = ""
        session.epoch += 1  # steps of the attempt that failed are refused from now on
        dead = [h for h in session.route if not h.is_self and not self._members.alive(h.node_id)]
        if not dead:
            dead = self.unreachable(session.route)
            for h in dead:
                self._members.remove(h.node_id, f"failed during a step ({error})", "call failed")
        if not dead:  # nobody is down: a passing network error; undo the step everywhere and try again
            log.warning("session %s: step %d failed but every node answers (%s); retrying", session.sid, start, error)
            path, replayed = self.rebuild(session, start, {})
            return [], path, replayed, detected
        replaced = {i: self._succession.successor(hop, session.route) for i, hop in enumerate(session.route)
                    if hop in dead}
        ready = time.monotonic()
        session.route = tuple(replaced.get(i, h) for i, h in enumerate(session.route))
        self._placement.patch(self._succession.patched)
        if all(h.is_self or self._members.alive(h.node_id) for h in session.route):
            with session.lock:
                session.interrupted = ""  # set for this session by the loss it is getting over now
        path, replayed = self.rebuild(session, start, replaced)
        rebuilt = time.monotonic()
        records = []
        for i, new in replaced.items():
            record = self._log.of(dead[[h.layers for h in dead].index(new.layers)].node_id)
            if record is not None and record not in records:
                record.successor = record.successor or new.node_id
                ready_as = ("standby ready (no load)" if self._standbys.was_standby(new.node_id, new.layers)
                            else "successor ready")
                record.detail = record.detail or (f"{ready_as} after {1e3 * (ready - detected):.0f} ms, "
                                                  f"rebuilt in {1e3 * (rebuilt - ready):.0f} ms")
                records.append(record)
        log.info("session %s carried over at position %d by %s (%d positions replayed)", session.sid, start, path,
                 replayed)
        return records, path, replayed, detected

    def without_failover(self, session: Session, error: str) -> str:
        """What to tell a client whose session a node's failure ended (failover is off)."""
        dead = [h for h in session.route if not h.is_self and not self._members.alive(h.node_id)]
        dead = dead or self.unreachable(session.route)
        which = ", ".join(f"node {self._members.name_of(h.node_id)} ({h.address}, layers {h.layers})" for h in dead)
        return (f"{which or 'a node of its route'} failed, and failover is off (--no-failover), so the session "
                f"ended; start it again, or run the coordinator without --no-failover ({error})")

    def unreachable(self, route: tuple[RouteHop, ...]) -> list[RouteHop]:
        """The remote hops of `route` that are down: a ping is refused, or times out twice
        (PING_TIMEOUT_S) from a node whose heartbeats have also stopped (a busy node still heartbeats)."""
        remote = [h for h in route if not h.is_self]

        def down(h: RouteHop) -> bool:
            for _ in range(2):
                try:
                    self._peers.of(h).ping(timeout=PING_TIMEOUT_S)
                    return False
                except UnreachableError:
                    return True  # nothing listens there any more
                except SwarmError:
                    pass
            silent = self._members.silent_for(h.node_id)
            return silent is None or silent > 2 * HEARTBEAT_S

        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(remote))) as pool:
            return [h for h, d in zip(remote, pool.map(down, remote)) if d]

    def rebuild(self, session: Session, start: int, replaced: dict[int, RouteHop]) -> tuple[str, int]:
        """Bring the replaced hops of a session to `start` positions; ('standby', 'replay' or 'recompute',
        positions run)."""
        route = session.route
        try:
            if self.recompute_only:
                raise KVStateError("rebuilding from kept states is switched off")
            for i, hop in enumerate(route):
                if i not in replaced:
                    self._peers.of(hop).rewind(m.Rewind(session.sid, hop.layers, start, session.epoch))
            base = {i: session.checkpoints.newest(route[i].layers, start) for i in replaced}
            replayed = 0
            for i in sorted(replaced):
                hop, at = route[i], base[i].positions
                nxt = route[i + 1].layers if i + 1 < len(route) else None
                # What the new hop keeps for the next one: from that one's checkpoint (or rebuild point) on.
                keep = base[i + 1].positions if i + 1 in replaced else (session.kept_from(nxt) if nxt else 0)
                peer = self._peers.of(hop)
                self._stepper.open(session, hop, history=session.tokens[:at])
                if not self._from_held(session, hop, base[i], keep):
                    peer.import_state(m.ImportState(session.sid, hop.layers, keep, session.epoch),
                                      base[i].state())
                if i == 0:
                    for b_start, b_tokens in self.batches(session, at, start):
                        peer.replay(m.Step(session.sid, b_start, tuple(b_tokens), hop.layers, replay=True,
                                           keep_from=keep, epoch=session.epoch))
                else:
                    up = route[i - 1]
                    self._peers.of(up).resend(m.Resend(session.sid, up.layers, at, start,
                                                       m.Hop(hop.address, hop.layers, keep_from=keep), session.epoch))
                replayed += start - at
            path = failover.STANDBY if all(self._standbys.was_standby(h.node_id, h.layers)
                                           for h in replaced.values()) else failover.REPLAY
        except (KVStateError, BadInputError) as e:
            # What was kept does not reach back far enough: run the session's tokens through again.
            log.warning("session %s: rebuilding from kept states failed (%s); recomputing from its tokens",
                        session.sid, e)
            session.checkpoints.clear()
            session.since.clear()
            session.take_pending()  # no checkpoints while the tokens run through again
            for hop in route:
                self._stepper.open(session, hop)
            for b_start, b_tokens in self.batches(session, 0, start):
                self._stepper.run(session, b_tokens, b_start, sample=False)
            path, replayed = failover.RECOMPUTE, start
        # Checkpoint every remote hop with the next step, so what each keeps is consistent again.
        session.ask_checkpoint(*(h.layers for h in route if not h.is_self))
        return path, replayed

    def _from_held(self, session: Session, hop: RouteHop, checkpoint, keep: int) -> bool:
        """A standby that took `hop`'s range over imports what it holds of the session, brought up to
        `checkpoint` with the deltas it had not received yet (on this machine: no whole state crosses the
        network). False when it holds no earlier state of that chain, or what it holds does not import."""
        deltas = self._standbys.catch_up(hop.node_id, hop.layers, session.sid, checkpoint)
        if deltas is None:
            return False
        peer = self._peers.of(hop)
        try:
            for blob in deltas:
                peer.import_state(m.ImportState(session.sid, hop.layers, epoch=session.epoch, mode=m.HOLD), blob)
            got = peer.import_state(m.ImportState(session.sid, hop.layers, keep, session.epoch, mode=m.HELD), b"")
        except (KVStateError, BadInputError) as e:  # (a remote node's KVStateError arrives as BadInputError)
            log.warning("session %s: the standby of layers %s could not import what it held (%s); sending the "
                        "whole state", session.sid, hop.layers, e)
            return False
        if got != checkpoint.positions:
            log.warning("session %s: the standby of layers %s held %d positions, not %d; sending the whole state",
                        session.sid, hop.layers, got, checkpoint.positions)
            return False
        log.info("session %s: the standby of layers %s imported the %d positions it held (%d deltas sent now)",
                 session.sid, hop.layers, got, len(deltas))
        return True

    def batches(self, session: Session, frm: int, to: int) -> list[tuple[int, list[int]]]:
        """The session's positions frm..to-1 as they were first run: prompt pieces of n_batch, then one by one."""
        out, p = [], frm
        while p < to:
            if p < session.prompt_len:
                if p % self._n_batch:
                    raise KVStateError(f"position {p} is inside a prompt batch; cannot replay from there")
                end = min(p + self._n_batch, session.prompt_len)
                if end > to:
                    raise KVStateError(f"positions {p}:{end} were one batch; cannot replay a part of it")
            else:
                end = p + 1
            out.append((p, session.tokens[p:end]))
            p = end
        return out
