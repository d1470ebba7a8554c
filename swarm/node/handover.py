"""Sessions moving between nodes: rewind, import a KV state, resend kept outputs, hand a session over.

A recovery cuts surviving hops back to the failed step (`rewind`), loads the last checkpoint on the
successor (`import_state`) and has the hop before it send its kept outputs again (`resend`), one step
per original batch, so the rebuilt KV cache is bit-identical. A node that leaves on purpose ships each
session's state to its successor itself (`handoff`). See docs/fault-tolerance.md.
"""

from __future__ import annotations

from typing import Callable

from .. import messages as m
from ..errors import BadInputError
from .shards import Shelf
from .stepping import check_session_id


class Handover:
    """`peers.get(address)` reaches the node a session goes to; `touch(session)` marks it in use."""

    def __init__(self, shelf: Shelf, peers, touch: Callable[[str], None]):
        self._shelf, self._peers, self._touch = shelf, peers, touch

    def rewind(self, order: m.Rewind) -> int:
        """Cut a session back to `length` positions on one shard (and what it kept for the next hop)."""
        entry = self._shelf.entry(order.layers)
        sid = check_session_id(order.session)
        with entry.lock:
            entry.shard.session_length(sid)  # unknown sessions are refused before anything changes
            entry.enter(sid, order.epoch)
            entry.bump(sid)  # a step still unwinding from the failure must not roll back what comes next
            entry.shard.rollback(sid, order.length)
            entry.kept.truncate(sid, order.length)
            sampler = entry.samplers.get(sid)
            if sampler is not None:
                sampler.rewind(order.length)
            return entry.shard.session_length(sid)

    def import_state(self, state: m.ImportState, blob: bytes) -> int:
        """Load a session's KV state into one shard (the session must be open), with the kept outputs;
        the positions it holds then. A standby holds the state instead (`m.HOLD`: nothing is imported)
        and imports what it holds when it takes over (`m.HELD`)."""
        entry = self._shelf.entry(state.layers)
        sid = check_session_id(state.session)
        if state.mode not in (m.IMPORT_NOW, m.HOLD, m.HELD):
            raise BadInputError(f"unknown import mode {state.mode[:40]!r}; use '', 'hold' or 'held'")
        if state.mode == m.HOLD:
            if state.kept:
                raise BadInputError("a held KV state comes without kept outputs")
            positions = entry.held.hold(sid, blob)
            self._touch(sid)
            return positions
        if state.mode == m.HELD:
            if blob:
                raise BadInputError("an import of the held KV state carries no state of its own")
            if sid not in entry.shard.sessions():
                raise BadInputError(f"session {sid!r} is not open on layers {entry.shard.layers}; open it first")
            blob = entry.held.whole(sid)  # (dropped below once imported: a refusal leaves it held)
        if sid not in entry.shard.sessions():
            raise BadInputError(f"session {sid!r} is not open on layers {entry.shard.layers}; open it first")
        width = 4 * entry.shard.n_embd
        at = state.kept[0].start if state.kept else 0
        for s in state.kept:  # what a shard kept of its own outputs: contiguous steps of its hidden-state width
            if not s.tokens or s.start != at or len(s.hidden) != len(s.tokens) * width:
                raise BadInputError("kept outputs must be contiguous steps of at least one position, each with "
                                    f"{width} bytes of hidden state per position")
            at = s.end
        with entry.lock:
            entry.enter(sid, state.epoch)
            entry.bump(sid)
            if blob:
                entry.shard.import_kv(sid, blob)
            else:
                entry.shard.rollback(sid, 0)
            held = entry.shard.session_length(sid)
            if at > held:
                entry.shard.rollback(sid, 0)
                raise BadInputError(f"kept outputs go beyond the {held} positions the KV state holds")
            entry.kept.replace(sid, list(state.kept), state.keep_from)
        entry.held.drop(sid)  # imported, or superseded by a whole state the standby was handed
        self._touch(sid)
        return held

    def resend(self, order: m.Resend) -> int:
        """Send the kept outputs order.start..order.end-1 to `order.to`, one step per original batch; the
        positions sent."""
        entry = self._shelf.entry(order.layers)
        sid = check_session_id(order.session)
        steps = entry.kept.steps(sid, order.start, order.end)
        target = self._peers.get(order.to.address)
        for s in steps:
            target.replay(m.Step(sid, s.start, s.tokens, order.to.layers, s.hidden, replay=True,
                                 keep_from=order.to.keep_from, epoch=order.epoch))
        return sum(len(s.tokens) for s in steps)

    def handoff(self, order: m.Handoff) -> int:
        """Ship a session's KV state and kept outputs to the node that takes this shard over; the positions
        it holds there."""
        entry = self._shelf.entry(order.layers)
        sid = check_session_id(order.session)
        blob = entry.shard.export_kv(sid)
        steps, first = entry.kept.all(sid)
        state = m.ImportState(sid, order.to.layers, first, order.epoch, tuple(steps))
        positions = self._peers.get(order.to.address).import_state(state, blob)
        entry.forget(sid)  # the session lives on the successor now
        return positions
