"""Measuring the nodes: their compute on slices of this model, their link to here, and links between them.

What is measured feeds the planner (`planner.plan_measured`), `swarm status`, and the choice of a
successor when a node fails. A node is measured once when it joins (its compute is cached on the node),
again after it failed to be measured or to load, or when `forget` says its figures went stale.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Sequence

from .. import calibration as cal
from .. import messages as m
from .. import planner
from ..errors import NotReadyError, SwarmError
from ..layers import LayerRange
from ..placement import Footprint
from ..profiling import measure_link
from .members import RETRY_S, Member, Membership
from .shardfiles import ShardFiles

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 600.0  # fetching the probe slices and timing them


class Measurer:
    """The measured figures of every node; thread-safe. `peers.remote(member)` reaches a node."""

    def __init__(self, footprint: Footprint, n_layer: int, files: ShardFiles, members: Membership, local, peers,
                 reprofile: bool = False):
        self.footprint, self.n_layer = footprint, n_layer
        self._files, self._members, self._local, self._peers = files, members, local, peers
        self._reprofile = reprofile
        self._lock = threading.Lock()
        self._probed: dict[str, m.ProbeResult] = {}
        self._to_me: dict[str, m.Link] = {}  # each node's link to the coordinator
        self._links: dict[tuple[str, str], tuple[float, float]] = {}  # (a, b) -> (rtt_s, bandwidth_bps)
        # Each node's probe corrected by the steps it runs (calibration.py), and who to probe afresh.
        self._calibration: dict[str, cal.Calibration] = {}
        self._refresh: set[str] = set()

    def probed(self, node_id: str) -> m.ProbeResult | None:
        with self._lock:
            return self._probed.get(node_id)

    def link_to_me(self, node_id: str) -> m.Link | None:
        with self._lock:
            return self._to_me.get(node_id)

    def forget(self, node_id: str) -> None:
        """Measure this node again from scratch the next time."""
        with self._lock:
            self._probed.pop(node_id, None)

    def links(self) -> dict[tuple[str, str], tuple[float, float]]:
        with self._lock:
            return dict(self._links)

    def measure(self, members: Sequence[Member], say=lambda text: None, refresh: bool = False) -> None:
        """Profile members not yet measured (with `refresh`, also those whose steps asked for a new probe:
        only between sessions, a node refuses probes while it serves): compute on slices of this model,
        and their link to here; `say` hears what is being done. NotReadyError names those that could not
        be measured (left out of plans for RETRY_S)."""
        with self._lock:
            again = set(self._refresh) if refresh else set()
        todo = [x for x in members if self.probed(x.node_id) is None or x.node_id in again]
        if not todo:
            return
        # Two middle slices: one layer, and as many more (up to 6) as fit a small budget, so that a
        # big model's probe stays far below any node's memory (a 70B layer alone is ~0.5 GB).
        budget = min(256 << 20, min(x.usable_memory() for x in todo) // 8)
        k, size = 1, self.footprint.layer_bytes[1]
        while k < min(6, self.n_layer - 2) and size + self.footprint.layer_bytes[1 + k] <= budget:
            size += self.footprint.layer_bytes[1 + k]
            k += 1
        ranges = [LayerRange(1, 2)] + ([LayerRange(1, 1 + k)] if k > 1 else [])
        shards = tuple(self._files.spec(r) for r in ranges)
        say("measuring " + ", ".join(x.name for x in todo))
        failed = []
        # One node at a time: nodes that share a machine (a local swarm, or two nodes on one box)
        # would otherwise measure each other's load instead of their own speed.
        for x in todo:
            try:
                with self._lock:
                    refresh = (x.is_self and self._reprofile) or x.node_id in self._refresh
                self._measure_one(x, m.ProbeOrder(shards, 32, 128, refresh=refresh))
            except SwarmError as e:
                self._members.exclude(x.node_id, f"could not be measured: {e}; trying again in {RETRY_S:.0f} s")
                failed.append(f"{x.name}: {e}")
        if failed:
            raise NotReadyError("some nodes could not be measured; planning without them: " + "; ".join(failed))

    def _measure_one(self, x: Member, order: m.ProbeOrder) -> None:
        if x.is_self:
            result, link = self._local.probe(order), m.Link(0.0, float("inf"))
        else:
            remote = self._peers.remote(x)
            result = remote.probe(order, PROBE_TIMEOUT_S)
            link = measure_link(lambda payload, reply: remote.ping(payload, reply, timeout=10.0),
                                self.footprint.n_embd * 4)
        with self._lock:
            self._probed[x.node_id], self._to_me[x.node_id] = result, link
            before = self._calibration.get(x.node_id, cal.Calibration())
            self._calibration[x.node_id] = before if result.cached else cal.probed(before, time.monotonic())
            self._refresh.discard(x.node_id)
        p = result.profile
        log.info("measured %s: %.2f ns/byte decode, %.2f ms per step, %.2f ms round trip%s", x.name,
                 1e9 * p.decode_s_per_byte, 1e3 * p.step_overhead_s, 1e3 * link.rtt_s,
                 " (compute from its cache)" if result.cached else "")

    def profiles(self, members: Sequence[Member]) -> list[planner.NodeProfile]:
        """The planner's view of measured members: each probe corrected by the steps the node ran."""
        out = []
        for x in members:
            base = self._base(x)
            if base is not None:
                with self._lock:
                    scale = self._calibration.get(x.node_id, cal.Calibration()).scale
                out.append(cal.corrected(base, scale))
        return out

    def _base(self, x: Member) -> planner.NodeProfile | None:
        """A member as its probe measured it (None: not measured)."""
        probed, link = self.probed(x.node_id), self.link_to_me(x.node_id)
        if probed is None or link is None:
            return None
        p = probed.profile
        return planner.NodeProfile(
            node_id=x.node_id, memory=x.usable_memory(), decode_s_per_byte=p.decode_s_per_byte,
            prefill_s_per_byte=p.prefill_s_per_byte, step_overhead_s=p.step_overhead_s,
            rtt_s=link.rtt_s, bandwidth_bps=link.bandwidth_bps, pin=x.pin, is_coordinator=x.is_self,
            memory_total=x.plan_resources.memory_total, memory_free=x.plan_resources.memory_available,
            head_s_per_byte=p.head_s_per_byte,
        )

    def observe(self, hops, members: Sequence[Member], result: m.StepResult) -> None:
        """A decode step of a session alone on its route: each hop's compute against its probe's prediction."""
        by_layers = {h.layers: h for h in hops}
        by_id = {x.node_id: x for x in members}
        for t in result.timings:
            hop = by_layers.get(t.layers)
            x = by_id.get(hop.node_id) if hop is not None else None
            base = self._base(x) if x is not None else None
            if base is None:
                continue
            predicted = planner.hop_decode_s(self.footprint, base, t.layers)
            with self._lock:
                now = self._calibration.get(x.node_id, cal.Calibration())
                self._calibration[x.node_id] = cal.observe(now, [predicted], [t.compute_ms / 1e3])

    def assess(self, node_ids: Sequence[str]) -> str:
        """After a session: take what its steps say of each node. "probe": some node is to be measured
        again (then planned); "plan": some node's speed moved (plan again if that changes the route);
        "" otherwise."""
        todo = ""
        for node_id in node_ids:
            with self._lock:
                now = self._calibration.get(node_id)
                if now is None:
                    continue
                verdict = cal.assess(now, time.monotonic())
                self._calibration[node_id] = verdict.calibration
                if verdict.reprobe:
                    self._refresh.add(node_id)
            if verdict.changed or verdict.reprobe:
                log.info("node %s runs at %.2fx its probe's prediction%s", node_id, verdict.ratio,
                         "; probing it again" if verdict.reprobe else "; planning with that")
                todo = "probe" if verdict.reprobe or todo == "probe" else "plan"
        return todo

    def measure_route(self, route, members: Sequence[Member]) -> None:
        """Measure the links between consecutive nodes of a new route (a link from here is the node's own,
        measured when it joined)."""
        for a, b in zip(route, route[1:]):
            with self._lock:
                known = (a.node_id, b.node_id) in self._links
            if a.is_self or b.is_self or known:
                continue
            try:
                by_id = {x.node_id: x for x in members}
                link = self._peers.remote(by_id[a.node_id]).measure_link(
                    b.address, min(self.footprint.n_embd * 4, 1 << 16), 8)
                with self._lock:
                    self._links[(a.node_id, b.node_id)] = (link.rtt_s, link.bandwidth_bps)
            except (SwarmError, KeyError) as e:
                log.warning("could not measure the link %s -> %s: %s", a.address, b.address, e)

    def step_seconds(self, node_id: str, bytes_read: int) -> float:
        """The predicted compute of one decode step over `bytes_read` of weights on a node (0: unmeasured)."""
        probed = self.probed(node_id)
        if probed is None:
            return 0.0
        return probed.profile.step_overhead_s + probed.profile.decode_s_per_byte * bytes_read
