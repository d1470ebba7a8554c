"""Succession: which live node takes a lost or leaving node's range, and the record of every recovery.

A successor is chosen once per lost node and range (`failover.choose_successor`, a pure function) and
loads the range beside what it holds; later sessions through the same loss reuse it. A node that leaves
on purpose gets its successors first, and its sessions move to them between two steps (migration.py).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

from .. import failover
from .. import messages as m
from ..errors import CapacityError, SwarmError
from ..failover import Recovery
from ..layers import LayerRange
from .measuring import Measurer
from .members import Member, Membership
from .peers import Peers, RouteHop
from .planning import Placement, Route
from .shardfiles import ShardFiles
from .standbys import Standbys

log = logging.getLogger(__name__)


class RecoveryLog:
    """The recent recoveries (shown by `swarm status`), one record per lost or leaving node; thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._records: collections.deque[Recovery] = collections.deque(maxlen=50)
        self._of: dict[str, Recovery] = {}  # node id -> the record of its loss

    def open(self, member: Member, layers: list[LayerRange], detection: str, detail: str = "") -> Recovery:
        """The record of a node's loss, made on the first word of it."""
        with self._lock:
            record = self._of.get(member.node_id)
            if record is None:
                record = Recovery(member.name, member.address, tuple(layers), detection, detail=detail)
                self._records.append(record)
                self._of[member.node_id] = record
            return record

    def of(self, node_id: str) -> Recovery | None:
        with self._lock:
            return self._of.get(node_id)

    def note(self, record: Recovery, path: str, stall_s: float, replayed: int) -> None:
        with self._lock:
            record.add_session(path, stall_s, replayed)

    def reports(self, name_of) -> tuple[m.RecoveryReport, ...]:
        with self._lock:
            return tuple(m.RecoveryReport(
                r.at_unix, r.node, r.address, r.layers[0] if r.layers else None, r.detection, r.path, r.sessions,
                r.stall_s, ", ".join(name_of(i) for i in r.successor.split(", ") if i), r.replayed_positions,
                r.detail) for r in self._records)


class Succession:
    """Successors of lost and leaving nodes; thread-safe (one decision at a time: two could pick the
    same node's memory)."""

    def __init__(self, members: Membership, placement: Placement, measurer: Measurer, files: ShardFiles,
                 peers: Peers, standbys: Standbys):
        self._members, self._placement, self._measurer, self._files, self._peers = (
            members, placement, measurer, files, peers)
        self._standbys = standbys
        self._decide = threading.Lock()
        self._lock = threading.Lock()
        self._replacements: dict[tuple[str, LayerRange], RouteHop] = {}  # (lost node, range) -> successor
        self._leaving: dict[str, dict[LayerRange, RouteHop]] = {}  # node leaving gracefully -> successors

    def clear(self) -> None:
        """A new route was planned: the successors of earlier losses are part of it or gone."""
        with self._lock:
            self._replacements.clear()

    def leaving(self, node_id: str | None = None) -> dict:
        """The successors of a leaving node (or of all of them, by node)."""
        with self._lock:
            return dict(self._leaving.get(node_id, {})) if node_id else {k: dict(v) for k, v in self._leaving.items()}

    def patched(self, route: Route) -> Route:
        """`route` with every lost or leaving hop replaced by its successor."""
        with self._lock:
            out = []
            for h in route:
                h = self._replacements.get((h.node_id, h.layers), h)
                h = self._leaving.get(h.node_id, {}).get(h.layers, h)
                out.append(h)
            return tuple(out)

    def successor(self, lost: RouteHop, route: Route) -> RouteHop:
        """The hop that replaces `lost` (decided once per lost node and range; later sessions reuse it)."""
        with self._decide:
            with self._lock:
                done = self._replacements.get((lost.node_id, lost.layers)) or self._leaving.get(
                    lost.node_id, {}).get(lost.layers)  # a node that died while handing over: its successor is ready
            if done is not None and self._members.alive(done.node_id):
                return done
            gone = self._members.known(lost.node_id) or Member(lost.node_id, lost.node_id, lost.address, "",
                                                               m.Resources(), None)
            hop = self._take_over(gone, lost.layers, route)
            with self._lock:
                self._replacements[(lost.node_id, lost.layers)] = hop
            return hop

    def prepare_leave(self, gone: Member, ranges: list[LayerRange]) -> dict[LayerRange, RouteHop]:
        """Load a leaving node's ranges on successors while its sessions go on; they move at their next step."""
        with self._decide:
            successors = {r: self._take_over(gone, r) for r in ranges}
        with self._lock:
            self._leaving[gone.node_id] = successors
        return successors

    def left(self, node_id: str) -> None:
        with self._lock:
            self._leaving.pop(node_id, None)

    def _take_over(self, gone: Member, layers: LayerRange, route: Route = ()) -> RouteHop:
        """The range's standby, which needs no load, or else load `layers` on the best live node beside what
        it holds; raises PeerError when none can."""
        sb = self._standbys.take(layers)
        x = self._members.get(sb.node_id) if sb is not None else None
        if x is not None:
            self._placement.took_over(x.node_id, layers, sb.shard_id)
            self._standbys.rearrange()  # guard what is left with the memory left (never by the node that serves it)
            self._members.mark(x.node_id, "ready")
            log.info("node %s takes layers %s over from %s: it stood by (no load)", x.name, layers, gone.name)
            return RouteHop(x.node_id, x.address, layers, x.is_self, x.steps)
        fp, s = self._measurer.footprint, self._placement.settings
        need = fp.shard_bytes(layers, s.n_ctx, s.max_sessions, s.n_batch)
        spec = self._files.spec(layers)
        tried: set[str] = {gone.node_id}
        leaving = set(self.leaving())
        while True:
            on_route = {h.node_id for h in route or self._placement.route() or ()}
            now = time.monotonic()
            pool = {x.node_id: x for x in self._members.all()
                    if x.node_id not in tried and x.node_id not in leaving and x.excluded_until <= now
                    and x.state not in ("failed", "leaving")
                    and (x.is_self or self._measurer.probed(x.node_id) is not None)}
            candidates, standing = [], {}
            for x in pool.values():
                held = self._placement.holding(x.node_id)
                standing[x.node_id] = self._standbys.bytes_on(x.node_id)
                candidates.append(failover.Candidate(
                    node_id=x.node_id, name=x.name,
                    free_bytes=x.usable_memory() - sum(fp.shard_bytes(r, s.n_ctx, s.max_sessions, s.n_batch)
                                                       for r in held.hosted()) - standing[x.node_id],
                    has_file=x.is_self or spec.shard_id in held.files,
                    step_s=self._measurer.step_seconds(x.node_id, need),
                    serves_route=x.node_id in on_route,
                ))
            choice = failover.choose_successor(need, candidates)
            if choice is None:  # standbys give their memory back to a successor that needs it
                choice = failover.choose_successor(need, [dataclasses.replace(
                    c, free_bytes=c.free_bytes + standing[c.node_id]) for c in candidates])
                if choice is not None:
                    self._standbys.give_back(choice.node_id)
            if choice is None:
                raise CapacityError(
                    f"node {gone.name} ({gone.address}) is gone and no live node has {need >> 20} MB free for its "
                    f"layers {layers}; add a node (swarm join) or give one more --max-memory"
                )
            x = pool[choice.node_id]
            try:
                self._peers.load(x, m.Load(spec, s, extra=True))
            except SwarmError as e:
                log.warning("node %s could not take layers %s: %s", x.name, layers, e)
                tried.add(x.node_id)
                continue
            self._placement.took_over(x.node_id, layers, spec.shard_id)
            self._members.mark(x.node_id, "ready")
            log.info("node %s takes layers %s over from %s", x.name, layers, gone.name)
            return RouteHop(x.node_id, x.address, layers, x.is_self, x.steps)
