"""Placement: plan the route whenever the membership changes and no session runs, and load it.

The plan itself is a pure function (`planner.plan_measured`); this room measures newcomers first
(measuring.py), tells each node what to load, measures the new route's links, and owns the result: the
route new sessions start on, what each node holds, the state `swarm status` shows, and the predicted
and measured speed of the route.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence, TypeVar

from .. import messages as m
from .. import placement, planner
from ..errors import NotReadyError, SwarmError
from ..layers import LayerRange
from .measuring import Measurer
from .members import Member, Membership
from .peers import Peers, RouteHop
from .shardfiles import ShardFiles

log = logging.getLogger(__name__)

T = TypeVar("T")
# A node asked to be probed again is probed only after the swarm has had no session for this long, so that
# a user's requests one after another are not held back (the probe runs in process time they would share).
REPROBE_IDLE_S = 2.0
Route = tuple[RouteHop, ...]


@dataclass
class Holding:
    """What a node holds: its planned range, ranges taken over since, the shard files it was given."""

    layers: LayerRange | None = None
    extra: list[LayerRange] = field(default_factory=list)  # ranges taken over from failed nodes
    files: set[str] = field(default_factory=set)  # shard ids this node was given (it keeps them cached)
    reason: str = ""  # the planner's word on this node

    def hosted(self) -> list[LayerRange]:
        return ([self.layers] if self.layers is not None else []) + self.extra


class Placement:
    """The current route and what every node holds; thread-safe. `busy()` says whether sessions run
    (a re-plan waits for none); `on_route()` hears of each new route."""

    def __init__(self, members: Membership, measurer: Measurer, files: ShardFiles, peers: Peers,
                 settings: m.ContextSettings, busy: Callable[[], bool], on_route: Callable[[], None]):
        self._members, self._measurer, self._files, self._peers = members, measurer, files, peers
        self.settings = settings
        self._busy, self._on_route = busy, on_route
        self._cond = threading.Condition()
        self._route: Route | None = None
        self._state, self._detail = "planning", "planning placement"
        self._dirty = True
        self._recheck = False
        self._reprobe = False  # some node's steps asked for a new probe: taken once the swarm is idle
        self._probing = False  # that probe runs: new sessions wait for it (it is short)
        self._active = time.monotonic()  # when a session last started or ended
        self._holdings: dict[str, Holding] = collections.defaultdict(Holding)
        self._prediction: planner.Prediction | None = None
        self._measured: collections.deque[float] = collections.deque(maxlen=20)
        self._stop = threading.Event()

    # ------------------------------------------------------------ what others ask

    def mark_dirty(self) -> None:
        """The membership changed: plan again once no session runs."""
        with self._cond:
            self._dirty = True
            self._cond.notify_all()

    def recheck(self) -> None:
        """Nodes' measured speeds moved: plan again, and reload only if that changes the route."""
        with self._cond:
            self._recheck = True
            self._cond.notify_all()

    def reprobe(self) -> None:
        """Some node's steps parted from its probe: measure it again once no session has run for
        REPROBE_IDLE_S, keeping the route (it changes only if the new speeds change the plan)."""
        with self._cond:
            self._reprobe = True
            self._cond.notify_all()

    def poke(self) -> None:
        """Something a waiting planner or session may care about changed (a session ended)."""
        with self._cond:
            self._active = time.monotonic()
            self._cond.notify_all()

    def say(self, detail: str) -> None:
        with self._cond:
            self._detail = detail

    def route(self) -> Route | None:
        with self._cond:
            return self._route

    def start_session(self, register: Callable[[Route], T], timeout: float, is_active: Callable[[], bool]) -> T:
        """`register(route)` with the current route, waiting up to `timeout` s for one, under the lock a
        re-plan takes: the planner sees the session before it could replace the route."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._route is None or self._probing:
                left = deadline - time.monotonic()
                if left <= 0 or not is_active() or self._stop.is_set():
                    raise NotReadyError(f"the swarm is not ready: {self._detail}")
                self._cond.wait(min(left, 0.5))
            self._active = time.monotonic()
            return register(self._route)

    def wait_ready(self, timeout: float, is_active: Callable[[], bool] = lambda: True) -> Route:
        """The current route, waiting up to `timeout` s for one; NotReadyError says what is missing."""
        return self.start_session(lambda route: route, timeout, is_active)

    def holding(self, node_id: str) -> Holding:
        """A copy of what a node holds."""
        with self._cond:
            h = self._holdings.get(node_id) or Holding()
            return Holding(h.layers, list(h.extra), set(h.files), h.reason)

    def took_over(self, node_id: str, layers: LayerRange, shard_id: str) -> None:
        """A node loaded a lost range beside its own."""
        with self._cond:
            h = self._holdings[node_id]
            if layers not in h.hosted():
                h.extra.append(layers)
            h.files.add(shard_id)

    def forget(self, node_id: str) -> Holding:
        """A node is gone: what it held (if the current route runs through it and no session does, the
        route is dropped so that a new plan replaces it)."""
        with self._cond:
            h = self._holdings.pop(node_id, None) or Holding()
            return h

    def drop_route_through(self, node_id: str, why: str) -> None:
        """No session uses the lost node: plan the layers again (new sessions wait for it)."""
        with self._cond:
            if self._route is not None and any(h.node_id == node_id for h in self._route):
                self._route = None
                self._state, self._detail = "planning", why
            self._dirty = True
            self._cond.notify_all()

    def patch(self, fix: Callable[[Route], Route]) -> None:
        """Replace lost or leaving hops of the current route with their successors."""
        with self._cond:
            if self._route is not None:
                self._route = fix(self._route)

    def note_speed(self, route: Route, tokens_per_s: float) -> None:
        """A session's decode speed, counted when it ran on the route the prediction is for."""
        with self._cond:
            if self._route == route:
                self._measured.append(tokens_per_s)

    def report(self) -> tuple[str, str, float, float, int]:
        """(state, detail, predicted tokens/s, measured tokens/s, sessions measured)."""
        with self._cond:
            predicted = self._prediction.decode_tps if self._prediction is not None and self._route else 0.0
            measured = statistics.median(self._measured) if self._measured else 0.0
            return self._state, self._detail, predicted, measured, len(self._measured)

    # ------------------------------------------------------------ the planner's thread

    def start(self) -> None:
        threading.Thread(target=self._loop, name="planner", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        self.poke()

    def _loop(self) -> None:
        kept = None  # the route replaced by the plan under way, until a plan loads anything
        while not self._stop.is_set():
            with self._cond:
                while not self._stop.is_set() and not self._dirty and not self._recheck and not self._idle_probe():
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                recheck, self._recheck = self._recheck and not self._dirty, False
                probe = self._probing
            if probe:
                self._probe_in_place()
                continue
            if recheck:
                self._replan_in_place()
                continue
            try:
                # Newcomers are measured while the current route keeps serving.
                self._measurer.measure(self._members.plannable(), self.say)
            except SwarmError as e:
                log.warning("%s", e)
                self.mark_dirty()
            except Exception:
                log.exception("measuring nodes failed")
            with self._cond:
                # Re-plan only between sessions: a running session keeps the route it started with.
                while not self._stop.is_set() and not (self._dirty and not self._busy()):
                    self._cond.wait(0.5)
                if self._stop.is_set():
                    return
                self._dirty = False
                # No session may start on the old route while it is being replaced.
                kept, self._route = self._route or kept, None
                self._state, self._detail = "planning", "planning placement"
            time.sleep(0.2)  # let a burst of joins settle into one plan
            with self._cond:
                if self._dirty:
                    continue
            try:
                self._apply(self._members.plannable())
                kept = None
            except Exception as e:  # the planner must survive anything, or the swarm never serves again
                if isinstance(e, placement.PlacementError) and self._keep(kept, str(e)):
                    continue
                if not isinstance(e, placement.PlacementError):
                    kept = None  # shards may have moved: that route is no longer what the nodes hold
                with self._cond:
                    self._route = None
                    self._state, self._detail = "waiting", str(e)
                    self._cond.notify_all()
                if isinstance(e, placement.PlacementError):  # waiting for nodes is normal at start-up
                    log.info("%s", e)
                elif isinstance(e, SwarmError):
                    log.warning("%s", e)
                    if isinstance(e, NotReadyError):
                        self.mark_dirty()
                else:
                    log.exception("planning failed; retrying shortly")
                    self.mark_dirty()
                    self._stop.wait(2.0)

    def _keep(self, route: Route | None, why: str) -> bool:
        """No plan fits the nodes left (pinned ranges that no longer cover the model, say), but the route in
        use (one a recovery repaired, say) still runs on them: keep serving on it. Whether it was kept."""
        alive = {x.node_id for x in self._members.plannable()}
        if route is None or any(h.node_id not in alive for h in route):
            return False
        with self._cond:  # (if the membership changed meanwhile, the loop plans again from this route)
            self._route = route
            self._state, self._detail = "ready", f"kept the route in use ({why})"
            self._cond.notify_all()
        log.warning("no new placement fits (%s); keeping the route in use", why)
        return True

    def _plan(self, members: Sequence[Member]) -> planner.MeasuredPlan:
        s = self.settings
        current = {x.node_id: self.holding(x.node_id).layers for x in members}
        current = {k: v for k, v in current.items() if v is not None}
        return planner.plan_measured(self._measurer.footprint, self._measurer.profiles(members), s.n_ctx,
                                     s.max_sessions, s.n_batch, links=self._measurer.links(), current=current)

    def _idle_probe(self) -> bool:
        """(Under the lock.) Whether to run a re-probe now: one is asked for, no re-plan is due, and no
        session has run for REPROBE_IDLE_S; if so, new sessions wait from here until it is done."""
        if (self._reprobe and not self._dirty and self._route is not None and not self._busy()
                and time.monotonic() - self._active >= REPROBE_IDLE_S):
            self._reprobe, self._probing = False, True
            return True
        return False

    def _probe_in_place(self) -> None:
        """Measure again the nodes whose steps asked for it, then plan with the new speeds in place."""
        try:
            self._measurer.measure(self._members.plannable(), self.say, refresh=True)
        except SwarmError as e:
            log.warning("%s", e)
        except Exception:
            log.exception("measuring nodes again failed")
        finally:
            with self._cond:
                self._probing = False
                self._cond.notify_all()
        self._replan_in_place()

    def _replan_in_place(self) -> None:
        """Plan with the nodes' corrected speeds; keep the route (and the sessions on it) when that plan is
        the route itself, else replace it like any re-plan."""
        members = self._members.plannable()
        try:
            plan = self._plan(members)
        except SwarmError as e:
            log.info("re-planning with measured speeds: %s", e)
            return
        route = self.route()
        if route is None or [(a.node_id, a.layers) for a in plan.assignments] != [(h.node_id, h.layers)
                                                                                 for h in route]:
            self.mark_dirty()
            return
        prediction = planner.predict(self._measurer.footprint, self._measurer.profiles(members), plan.assignments,
                                     self.settings.n_batch, links=self._measurer.links())
        with self._cond:
            self._prediction = prediction  # (the speeds measured are of this same route: they stay)
            for x in members:
                self._holdings[x.node_id].reason = plan.reasons.get(x.node_id, "")
        log.info("placement unchanged by the measured speeds; predicted %.1f tokens/s", prediction.decode_tps)

    def _apply(self, members: Sequence[Member]) -> None:
        # Anyone who joined since the measuring pass; nodes whose steps asked for a new probe (no session runs).
        self._measurer.measure(members, self.say, refresh=True)
        s = self.settings
        plan = self._plan(members)
        by_id = {x.node_id: x for x in members}
        with self._cond:
            for x in members:
                self._holdings[x.node_id].reason = plan.reasons.get(x.node_id, "")
            self._route = None
            self._state, self._detail = "planning", "loading shards: " + placement.describe(plan)
        log.info("placement: %s", ", ".join(f"{a.layers} -> {by_id[a.node_id].name}" for a in plan.assignments))
        jobs = {a.node_id: m.Load(self._files.spec(a.layers), s) for a in plan.assignments}
        jobs.update({node_id: m.Load(None) for node_id in plan.idle})
        failed = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(jobs))) as pool:
            futures = {node_id: pool.submit(self._load, by_id[node_id], order) for node_id, order in jobs.items()}
            for node_id, fut in futures.items():
                x, order = by_id[node_id], jobs[node_id]
                try:
                    fut.result()
                except SwarmError as e:
                    self._members.exclude(node_id, str(e))
                    failed.append(f"{x.name}: {e}")
                    continue
                with self._cond:
                    h = self._holdings[node_id]
                    h.layers = order.shard.layers if order.shard else None
                    h.extra = []
                    if order.shard:
                        h.files.add(order.shard.shard_id)
                self._members.mark(node_id, "ready" if order.shard else "idle")
        if failed:  # those nodes are left out of plans for a while, then tried again
            raise NotReadyError("some nodes could not load their shards; re-planning without them: "
                                + "; ".join(failed))
        route = tuple(RouteHop(a.node_id, by_id[a.node_id].address, a.layers, by_id[a.node_id].is_self,
                               by_id[a.node_id].steps) for a in plan.assignments)
        self._measurer.measure_route(route, members)
        prediction = planner.predict(self._measurer.footprint, self._measurer.profiles(members), plan.assignments,
                                     s.n_batch, links=self._measurer.links())
        self._on_route()  # (outside the lock: the recovery room takes its own)
        with self._cond:
            self._prediction = prediction
            self._measured.clear()
            if self._dirty:
                return  # the membership changed while loading; the next plan supersedes this one
            self._route = route
            self._state, self._detail = "ready", placement.describe(plan)
            self._cond.notify_all()
        log.info("swarm ready: %s", ", ".join(f"{h.layers} on {by_id[h.node_id].name}" for h in route))

    def _load(self, x: Member, order: m.Load) -> None:
        if order.shard is not None:
            self._members.mark(x.node_id, "loading")
        self._peers.load(x, order)
