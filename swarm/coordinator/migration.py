"""A node that leaves on purpose: its successors load its ranges while its sessions go on, then each
session moves between two steps, its KV state shipped node to node (no replay, no recompute)."""

from __future__ import annotations

import logging
import time

from .. import failover
from .. import messages as m
from ..errors import SwarmError
from .members import Membership
from .peers import Peers
from .planning import Placement
from .recovery import Recovery
from .sessions import Session, Sessions
from .stepping import Stepper
from .succession import RecoveryLog, Succession

log = logging.getLogger(__name__)

LEAVE_TIMEOUT_S = 60.0  # how long a leaving node waits for its sessions to move


class Migration:
    def __init__(self, members: Membership, placement: Placement, sessions: Sessions, succession: Succession,
                 log_: RecoveryLog, peers: Peers, stepper: Stepper, recovery: Recovery):
        self._members, self._placement, self._sessions, self._succession = members, placement, sessions, succession
        self._log, self._peers, self._stepper, self._recovery = log_, peers, stepper, recovery

    def leave(self, node_id: str, graceful: bool = False) -> m.Farewell:
        """A node leaves. Gracefully: its sessions move to successors between two steps, then it goes."""
        x = self._members.get(node_id)
        if x is None or x.is_self:
            return m.Farewell()
        used = sorted({h.layers for s in self._sessions.all() for h in s.route if h.node_id == node_id},
                      key=lambda r: r.start)
        if not (graceful and used):
            self._members.remove(node_id, "left")
            return m.Farewell()
        self._members.mark(node_id, "leaving", "handing its sessions over")
        t0 = time.monotonic()
        record = self._log.open(x, used, "left")  # before any session can move
        try:
            successors = self._succession.prepare_leave(x, used)
        except SwarmError as e:
            log.warning("node %s leaves, but %s; its sessions will be rebuilt", x.name, e)
            self._members.remove(node_id, "left")
            return m.Farewell(detail=str(e))
        record.detail = f"successor loaded in {1e3 * (time.monotonic() - t0):.0f} ms while the sessions went on"
        record.successor = ", ".join(sorted({h.node_id for h in successors.values()}))
        self._placement.patch(self._succession.patched)
        deadline = time.monotonic() + LEAVE_TIMEOUT_S
        while any(s.uses(node_id) for s in self._sessions.all()):
            if time.monotonic() > deadline:
                record.detail = f"sessions did not reach a step boundary in {LEAVE_TIMEOUT_S:.0f} s"
                break
            time.sleep(0.05)
        self._succession.left(node_id)
        self._members.remove(node_id, "left")
        if not record.sessions:
            record.path = failover.NONE
        log.info("node %s left; %d session(s) moved to %s", x.name, record.sessions, record.successor)
        return m.Farewell(record.sessions, record.detail)

    def migrate(self, session: Session) -> None:
        """Between two steps: hand the session's state on every leaving hop over to its successor."""
        leaving = self._succession.leaving()
        if not leaving:
            return
        moves = [(i, h, leaving[h.node_id][h.layers]) for i, h in enumerate(session.route)
                 if h.layers in leaving.get(h.node_id, {})]
        for i, old, new in moves:
            t0 = time.monotonic()
            path, replayed = failover.MIGRATE, 0
            try:
                self._stepper.open(session, new, history=session.tokens)
                self._peers.of(old).handoff(m.Handoff(session.sid, old.layers, m.Hop(new.address, new.layers),
                                                      session.epoch))
                session.route = session.route[:i] + (new,) + session.route[i + 1:]
            except SwarmError as e:  # the handover failed: rebuild the range on the successor instead
                log.warning("session %s: handing layers %s over failed (%s); rebuilding them", session.sid,
                            old.layers, e)
                session.route = session.route[:i] + (new,) + session.route[i + 1:]
                path, replayed = self._recovery.rebuild(session, session.positions, {i: new})
            record = self._log.of(old.node_id)
            if record is not None:
                self._log.note(record, path, time.monotonic() - t0, replayed)
