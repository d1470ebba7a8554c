"""`plan_measured`: the route with the lowest predicted time per token, found by the exact or the heuristic search.

Determinism: profiles are sorted by node id before anything else and measured links are read by
key, so any permutation of `profiles` (or of the mappings) gives the same assignments, prediction,
reasons and moved_layers; `idle` lists the same nodes in the order they were given (join order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..layers import LayerRange
from ..placement import Assignment, Footprint, PlacementError, check_fleet, check_pins
from .cost import _NO_LINKS, Links, NodeProfile, Prediction, _parts, predict
from .exact import _exact
from .heuristic import _greedy_reach, _heuristic
from .instance import _gaps, _Instance, _memory_table
from .reasons import _infeasible, _why_idle, _why_placed, _why_small

EXACT_LIMIT = 10  # free nodes up to which the search is exact (2^10 sets: under a second at 80 layers)


@dataclass(frozen=True)
class MeasuredPlan:
    """The chosen route, the nodes left out, its prediction and why each node got what it got."""

    assignments: tuple[Assignment, ...]  # route order = layer order, contiguous, cover 0..n_layer once
    idle: tuple[str, ...]  # node ids left out, in the order given
    prediction: Prediction
    reasons: Mapping[str, str]  # node_id -> one line: why this range, or why left out
    moved_layers: int  # layers whose node differs from `current` (all of them without one)


def _check_profile(p: NodeProfile) -> None:
    bad = []
    for name in ("decode_s_per_byte", "prefill_s_per_byte", "step_overhead_s", "head_s_per_byte"):
        v = getattr(p, name)
        if v is None and name == "head_s_per_byte":
            continue
        if not (math.isfinite(v) and v >= 0):
            bad.append(f"{name}={v}")
    if not p.rtt_s >= 0:  # inf is allowed: unreachable from the coordinator
        bad.append(f"rtt_s={p.rtt_s}")
    if not p.bandwidth_bps > 0:
        bad.append(f"bandwidth_bps={p.bandwidth_bps}")
    if p.memory < 0:
        bad.append(f"memory={p.memory}")
    if bad:
        raise PlacementError(f"node {p.node_id} has an unusable profile ({', '.join(bad)}); measure it again")


def _validate(fp, profiles, n_ctx, max_sessions, n_batch) -> list[NodeProfile]:
    check_fleet([p.node_id for p in profiles], n_ctx, max_sessions, n_batch)
    coords = sorted(p.node_id for p in profiles if p.is_coordinator)
    if len(coords) > 1:
        raise PlacementError(
            f"only one node can be the coordinator, not {', '.join(coords)}; profile one of them as such"
        )
    for p in profiles:
        _check_profile(p)
    nodes = sorted(profiles, key=lambda p: p.node_id)  # canonical order: input order cannot matter
    L = fp.n_layer
    check_pins(nodes, L, lambda a, b: fp.shard_bytes(LayerRange(a, b), n_ctx, max_sessions, n_batch))
    return nodes


def plan_measured(
    footprint: Footprint,
    profiles: Sequence[NodeProfile],
    n_ctx: int,
    max_sessions: int,
    n_batch: int = 512,
    links: Links = _NO_LINKS,
    current: Mapping[str, LayerRange] | None = None,
) -> MeasuredPlan:
    """The route with the lowest predicted decode latency (tie-breakers in the package docstring)."""
    fp = footprint
    nodes = _validate(fp, profiles, n_ctx, max_sessions, n_batch)
    L = fp.n_layer
    gaps = _gaps(nodes, L)
    sb = _memory_table(fp, gaps, n_ctx, max_sessions, n_batch)

    for key, value in links.items():
        if not (len(key) == 2 and len(value) == 2 and value[0] >= 0 and value[1] > 0):
            raise PlacementError(f"link {key} has an unusable measurement {value}; measure it again")

    # Nodes that cannot hold any range of a gap are out before the search (fewer sets to try).
    reasons: dict[str, str] = {}
    smallest = int(sb.min())  # every gap range's shard; the int64 maximum when pins hold every layer
    keep, small = [], []
    for p in nodes:
        if p.pin is None and not smallest <= p.memory:
            small.append(p.node_id)
            reasons[p.node_id] = _why_small(p, smallest, bool(gaps))
        else:
            keep.append(p)
    inst = _Instance(fp, keep, sb, n_batch, links, current)

    if len(inst.free) <= EXACT_LIMIT:
        route, fail = _exact(inst)
    else:
        route = _heuristic(inst)
        fail = _greedy_reach(inst) if route is None else None
    if route is None:
        if fail is None or fail[0] >= L:
            raise PlacementError(
                "no route reaches every layer over usable links (some rtt_s are infinite); "
                "check the network or leave the unreachable nodes out"
            )
        raise _infeasible(inst, *fail, [s for s in small if gaps])

    assignments = tuple(Assignment(inst.nodes[x].node_id, LayerRange(a, b)) for x, a, b in route)
    by_id = {p.node_id: p for p in nodes}
    prediction = predict(fp, nodes, assignments, n_batch, links)
    cur = current or {}
    moved = 0
    for a in assignments:
        r = cur.get(a.node_id)
        kept = max(0, min(a.layers.end, r.end) - max(a.layers.start, r.start)) if r is not None else 0
        moved += a.layers.count - kept

    used = {a.node_id for a in assignments}
    rates = sorted(by_id[a.node_id].decode_s_per_byte for a in assignments)
    pinned_ids = {p.node_id for p in nodes if p.pin is not None}
    for a in assignments:
        need = fp.shard_bytes(a.layers, n_ctx, max_sessions, n_batch)
        reasons[a.node_id] = _why_placed(fp, by_id[a.node_id], a.layers, rates, a.node_id in pinned_ids, need)
    route_ = [(a.node_id, a.layers) for a in assignments]
    base = _parts(fp, by_id, route_, links, n_batch)
    for p in nodes:
        if p.node_id not in used and p.node_id not in reasons:
            reasons[p.node_id] = _why_idle(inst, by_id, route_, base, pinned_ids, p)

    idle = tuple(p.node_id for p in profiles if p.node_id not in used)  # join order, like placement.plan
    ordered = {p.node_id: reasons[p.node_id] for p in nodes}  # id order: independent of the input order
    return MeasuredPlan(assignments, idle, prediction, MappingProxyType(ordered), moved)
