"""Standbys: nodes with memory to spare hold a loaded replica of a range they do not serve, kept current
with that range's checkpoints, so that losing the range needs no load.

After every plan, and after a loss, `failover.choose_standbys` (a pure function) picks which node stands
by for which range of the route, within each node's memory cap; this room has them load it beside what
they serve (`Load` with `extra`), forwards every checkpoint the coordinator keeps of a guarded range to
its standby from a background thread (as it came: a delta of a few kilobytes, which the standby holds
without importing it; a whole state only to start a chain), hands the standby over when its range is
lost (succession.py, and recovery.py, which has it import what it holds), and gives a standby's memory
back when a successor needs it. The step path never waits for a forward. See docs/fault-tolerance.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from .. import failover
from .. import messages as m
from ..errors import SwarmError
from ..layers import LayerRange
from .checkpoints import Checkpoint
from .measuring import Measurer
from .members import Member, Membership
from .peers import Peers
from .planning import Placement
from .shardfiles import ShardFiles

log = logging.getLogger(__name__)

SWEEP_S = 1.0  # how often sessions that ended are closed on the standbys
MAX_QUEUED = 64  # checkpoints waiting per session and range; past that only the newest is sent (whole)
NOTHING = (0, "")  # what a standby holds of a session after a forward to it failed (it may hold anything)


@dataclass
class Standby:
    """One node standing by for one range. Mutable, guarded by its Standbys' lock."""

    layers: LayerRange
    node_id: str
    holder: str  # node id of the node serving the range
    nbytes: int
    shard_id: str
    state: str = "loading"  # loading, ready
    received: int = 0  # checkpoints it took in since it was loaded
    held: dict[str, tuple[int, str]] = field(default_factory=dict)  # session id -> (positions, lineage) held


class Standbys:
    """The standbys of the current route; thread-safe. `find(session_id)` gives a running session or None."""

    def __init__(self, members: Membership, placement: Placement, measurer: Measurer, files: ShardFiles,
                 peers: Peers, find: Callable, enabled: bool = True, on_route_too: bool = False):
        self._members, self._placement, self._measurer, self._files, self._peers = (
            members, placement, measurer, files, peers)
        self._find = find
        self._on_route_too = on_route_too  # nodes on the route may stand by too (it costs their steps)
        self._cond = threading.Condition()
        self._by_range: dict[LayerRange, Standby] = {}
        self._taken: dict[tuple[str, LayerRange], Standby] = {}  # (node, range) -> a standby that took over
        self._queue: dict[tuple[str, LayerRange], tuple[object, list[Checkpoint]]] = {}  # to send, in order
        # Held while a checkpoint goes to a standby: a takeover or a drop waits for it.
        self._forwarding = threading.RLock()
        self._generation = 0  # raised by every plan: a load ordered before it no longer counts
        self._due = False
        self._enabled = enabled
        self._stop = threading.Event()
        self.forward_cpu_s = 0.0  # CPU time the forwarding thread spent

    # ------------------------------------------------------------ what others ask

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, on: bool) -> None:
        """Off: every standby gives its memory back and no new one is chosen (benchmarks, --no-standbys)."""
        with self._cond:
            self._enabled = on
            gone = list(self._by_range.values()) if not on else []
            if not on:
                self._by_range.clear()
                self._queue.clear()
            self._due = on
            self._cond.notify_all()
        for sb in gone:
            self._drop(sb)

    def replanned(self) -> None:
        """A new plan was loaded: it dropped every standby (nodes hold only their planned range); choose again."""
        with self._cond:
            self._generation += 1
            self._by_range.clear()
            self._taken.clear()
            self._queue.clear()
            self._due = True
            self._cond.notify_all()

    def rearrange(self) -> None:
        """The membership changed: guard what is unguarded (a standby was lost, a new node has memory)."""
        with self._cond:
            self._due = True
            self._cond.notify_all()

    def forget(self, node_id: str) -> None:
        """A node is gone: its standbys with it; others are chosen."""
        with self._cond:
            for layers in [r for r, sb in self._by_range.items() if sb.node_id == node_id]:
                del self._by_range[layers]
            self._due = True
            self._cond.notify_all()

    def guarded(self) -> frozenset:
        """The ranges a ready standby stands by for."""
        with self._cond:
            return frozenset(r for r, sb in self._by_range.items() if sb.state == "ready")

    def bytes_on(self, node_id: str) -> int:
        """The memory standbys take on a node."""
        with self._cond:
            return sum(sb.nbytes for sb in self._by_range.values() if sb.node_id == node_id)

    def give_back(self, node_id: str) -> None:
        """Drop a node's standbys: a successor needs their memory (chosen again elsewhere if there is room)."""
        with self._forwarding, self._cond:
            gone = [self._by_range.pop(r) for r in [r for r, sb in self._by_range.items() if sb.node_id == node_id]]
            self._due = True
            self._cond.notify_all()
        for sb in gone:
            log.info("node %s gives back the memory of its standby of layers %s", self._members.name_of(node_id),
                     sb.layers)
            self._drop(sb)

    def take(self, layers: LayerRange) -> Standby | None:
        """The ready standby of `layers`, which serves the range from now on (it stops being a standby)."""
        with self._forwarding:  # no checkpoint is on its way to it from here on
            with self._cond:
                sb = self._by_range.get(layers)
                x = self._members.get(sb.node_id) if sb is not None else None
                if sb is None or sb.state != "ready" or x is None or x.state in ("failed", "leaving"):
                    return None
                del self._by_range[layers]
                for key in [k for k in self._queue if k[1] == layers]:
                    del self._queue[key]
                self._taken[(sb.node_id, layers)] = sb
        return sb  # (the caller records that the node serves it, then calls `rearrange`)

    def catch_up(self, node_id: str, layers: LayerRange, session: str, checkpoint: Checkpoint) -> list[bytes] | None:
        """For a standby that took `layers` over: the deltas that bring what it holds of `session` to
        `checkpoint`, oldest first (often none); None when it holds no earlier state of that chain."""
        with self._cond:
            sb = self._taken.get((node_id, layers))
            held = sb.held.get(session) if sb is not None else None
        if held is None or not checkpoint.positions:
            return None
        out, c = [], checkpoint
        while (c.positions, c.lineage) != held:
            if c.parent is None or c.positions < held[0]:
                return None
            out.append(c.blob)
            c = c.parent
        return out[::-1]

    def was_standby(self, node_id: str, layers: LayerRange) -> bool:
        with self._cond:
            return (node_id, layers) in self._taken

    def offer(self, session, layers: LayerRange, checkpoint: Checkpoint) -> None:
        """A checkpoint of `layers` was kept: send it on to the range's standby (never blocks)."""
        with self._cond:
            sb = self._by_range.get(layers)
            if sb is None or sb.state != "ready":
                return
            key = (session.sid, layers)
            waiting = self._queue.get(key, (session, []))[1]
            if checkpoint.parent is None or len(waiting) >= MAX_QUEUED:
                waiting = []  # a whole state (or too many behind): what waits is no longer needed
            self._queue[key] = (session, waiting + [checkpoint])
            self._cond.notify_all()

    def reports(self) -> tuple[m.StandbyReport, ...]:
        with self._cond:
            out = list(self._by_range.values())
        return tuple(m.StandbyReport(sb.layers, self._members.name_of(sb.node_id), self._members.name_of(sb.holder),
                                     sb.nbytes, sb.state, sb.received) for sb in sorted(out, key=lambda s: s.layers.start))

    # ------------------------------------------------------------ the threads

    def start(self) -> None:
        threading.Thread(target=self._arrange_loop, name="standbys", daemon=True).start()
        threading.Thread(target=self._forward_loop, name="standby-checkpoints", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def _arrange_loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not (self._due and self._enabled):
                    self._cond.wait(SWEEP_S)
                self._due = False
            if self._placement.route() is None:  # planning: the new route's `replanned` comes
                continue
            try:
                self._arrange()
            except Exception:  # never stop guarding
                log.exception("choosing standbys failed; trying again shortly")
                self._stop.wait(2.0)
                self.rearrange()

    def _arrange(self) -> None:
        """Choose the route's standbys afresh (a lost standby's range may now outrank one that stands) and
        load what is missing; one that is no longer chosen gives its memory back first."""
        route = self._placement.route()
        if not route:
            return
        fp, s = self._measurer.footprint, self._placement.settings

        def need(layers: LayerRange) -> int:
            return fp.shard_bytes(layers, s.n_ctx, s.max_sessions, s.n_batch)

        now = time.monotonic()
        live = {x.node_id: x for x in self._members.all()
                if x.excluded_until <= now and x.state not in ("failed", "leaving", "backoff")
                and (x.is_self or self._measurer.probed(x.node_id) is not None)}
        serving = {h.layers: h.node_id for h in route}
        # The coordinator's own range is never rebuilt (if it fails, the swarm stops): nothing to guard.
        guarded = [failover.Guarded(h.layers, need(h.layers), h.node_id, self._members.risk(h.node_id, h.address),
                                    self._files.spec(h.layers).shard_id) for h in route if not h.is_self]
        on_route = {h.node_id for h in route}
        spares = []
        for x in live.values():
            held = self._placement.holding(x.node_id)
            spares.append(failover.Spare(x.node_id, x.usable_memory() - sum(need(r) for r in held.hosted()),
                                         x.node_id in on_route, None if x.is_self else frozenset(held.files),
                                         frozenset(held.hosted())))
        chosen = failover.choose_standbys(guarded, spares, self._on_route_too)
        with self._cond:
            generation = self._generation
            stale = [sb for r, sb in self._by_range.items() if chosen.get(r) != sb.node_id]
            for sb in stale:
                del self._by_range[sb.layers]
            missing = {r: n for r, n in chosen.items() if r not in self._by_range}
        for sb in stale:
            self._drop(sb)
        for layers, node_id in missing.items():
            self._load(live[node_id], Standby(layers, node_id, serving[layers], need(layers),
                                              self._files.spec(layers).shard_id), generation)

    def _load(self, x: Member, sb: Standby, generation: int) -> None:
        with self._cond:
            if generation != self._generation or sb.layers in self._by_range:
                return
            self._by_range[sb.layers] = sb
        t0 = time.monotonic()
        try:
            self._peers.load(x, m.Load(self._files.spec(sb.layers), self._placement.settings, extra=True))
        except SwarmError as e:
            log.warning("node %s could not load a standby of layers %s: %s", x.name, sb.layers, e)
            with self._cond:
                if self._by_range.get(sb.layers) is sb:
                    del self._by_range[sb.layers]
            return
        with self._cond:
            current = self._by_range.get(sb.layers) is sb and generation == self._generation
            if current:
                sb.state = "ready"
        if not current:  # a plan or a loss overtook it: give the memory back
            self._drop(sb)
            return
        log.info("node %s stands by for layers %s (served by %s), loaded in %.1f s", x.name, sb.layers,
                 self._members.name_of(sb.holder), time.monotonic() - t0)

    def _drop(self, sb: Standby) -> None:
        """Have a standby's node unload it (unless the node serves that range now)."""
        with self._forwarding:
            self._unload(sb)

    def _unload(self, sb: Standby) -> None:
        x = self._members.get(sb.node_id)
        route = self._placement.route() or ()
        if x is None or any(h.node_id == sb.node_id and h.layers == sb.layers for h in route) or (
                sb.layers in self._placement.holding(sb.node_id).hosted()):  # it serves the range now
            return
        try:
            self._peers.load(x, m.Load(None, drop=sb.layers))
        except SwarmError as e:
            log.warning("node %s could not drop its standby of layers %s: %s", x.name, sb.layers, e)

    def _forward_loop(self) -> None:
        # Forwarding is never urgent (a lagging standby imports from the coordinator's store at a takeover):
        # on Linux this thread yields its core to the route's compute (nice 19 applies per thread there).
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        swept = time.monotonic()
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._queue and time.monotonic() - swept < SWEEP_S:
                    self._cond.wait(SWEEP_S)
                item = None
                if self._queue:
                    key = next(iter(self._queue))
                    item = (key, *self._queue.pop(key))
            try:
                if item is not None:
                    cpu = time.thread_time()
                    self._forward(*item)
                    self.forward_cpu_s += time.thread_time() - cpu
                elif time.monotonic() - swept >= SWEEP_S:
                    swept = time.monotonic()
                    self._sweep()
            except Exception:  # a bug must not end forwarding for good: a takeover falls back to the store
                log.exception("forwarding checkpoints to the standbys failed")

    def _forward(self, key: tuple[str, LayerRange], session, checkpoints: list[Checkpoint]) -> None:
        """Have the standby hold these checkpoints of one session (nothing is imported until it takes over):
        each delta as it came when the standby holds the state it builds on, else the whole state."""
        sid, layers = key
        with self._forwarding:
            with self._cond:
                sb = self._by_range.get(layers)
            x = self._members.get(sb.node_id) if sb is not None and sb.state == "ready" else None
            if x is None or self._find(sid) is None:
                return
            peer = self._peers.of(x)
            for c in checkpoints:
                with self._cond:
                    held = sb.held.get(sid)
                fits = c.parent is not None and held == (c.parent.positions, c.parent.lineage)
                try:
                    peer.import_state(m.ImportState(sid, layers, epoch=session.epoch, mode=m.HOLD),
                                      c.blob if fits else c.state())
                except SwarmError as e:  # the standby is gone or busy: a later checkpoint (or the store) will do
                    log.warning("checkpoint of session %s not forwarded to the standby of layers %s: %s", sid,
                                layers, e)
                    with self._cond:
                        sb.held[sid] = NOTHING  # the next forward sends a whole state; the sweep still closes it
                    return
                with self._cond:
                    sb.held[sid] = (c.positions, c.lineage)
                    sb.received += 1

    def _sweep(self) -> None:
        """Close the sessions that ended on the nodes they were sent to as standbys (which drops what they
        hold of them), also on the standbys that took a range over."""
        with self._cond:
            ended = [(sb, sid) for sb in (*self._by_range.values(), *self._taken.values()) for sid in sb.held
                     if self._find(sid) is None]
            for sb, sid in ended:
                sb.held.pop(sid, None)
        for sb, sid in ended:
            x = self._members.get(sb.node_id)
            if x is not None:
                try:
                    self._peers.of(x).close_session(sid)
                except SwarmError as e:
                    log.debug("closing session %s on standby %s: %s", sid, x.name, e)
