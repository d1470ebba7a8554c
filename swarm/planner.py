"""Plan shards by measured speed: the contiguous layer split that minimises predicted time per token.

Cost model (one function, `predict`). A route is the assignments in layer order; the coordinator
drives each token step as a chain of nested calls coordinator -> hop 1 -> hop 2 -> ... -> last hop.

* compute bytes of a range = its blocks' weights, plus the output head if the range is the last one
  (output.weight, or the token embeddings when the head is tied to them); the first shard's
  embedding lookup reads one row and is left out.
* a hop costs step_overhead_s + decode_s_per_byte * block bytes + head_s_per_byte * head bytes per
  decoded token (head_s_per_byte: the node's probed cost per byte of the output head, whose tensor
  type often differs from the blocks'; without a head probe, decode_s_per_byte * head_cost_factor:
  the blocks' cost per weight, where the footprint counts weights), and
  step_overhead_s + prefill_s_per_byte * block bytes * n_batch + head_s_per_byte * head bytes per
  prompt batch of n_batch tokens (the head computes logits for the batch's last position only).
* a link costs rtt + payload / bandwidth, with payload = n_embd * 4 bytes (one position of f32 hidden
  state) per decoded token and n_batch times that per prompt batch. The links of a route are:
  coordinator -> first hop (free when the first hop is the coordinator itself), then each consecutive
  pair. A link between the coordinator and node x is x's own (rtt_s, bandwidth_bps). A link between
  two other nodes is the measured one from `links` (either key order), else it is estimated as going
  through the coordinator: rtt_a + rtt_b and the smaller bandwidth (conservative).
* decode latency = sum of hops + sum of links; prefill time likewise with the prefill terms.

Planner (`plan_measured`): among all routes (which free nodes take part, in which order, with which
contiguous split; pinned nodes hold exactly their pins; every shard fits its node's memory by
`Footprint.shard_bytes`), choose the lowest predicted decode latency, then the lowest prefill time,
then the fewest layers moved away from `current`, then the route whose (node id, range end) sequence
sorts first. Costs are compared as exact integers: every term is rounded to a tick of 2^-60 of a
bound on any route's cost, compute per layer, so that equal measurements give exactly equal costs
(two equal nodes, or a boundary moved between equally fast nodes, tie exactly and the tie-breakers
decide), while all the rounding in a route stays below (L + 2 * nodes) * 2^-61 of that bound.

Search: with F free nodes, a dynamic programme over states (set of free nodes used so far, last hop,
next layer to place) is exact, because the cost of the rest of a route depends only on those three:
the set keeps each node to one shard, the last hop prices the next link, and the position fixes the
memory roles (first/last shards carry embeddings). It runs backwards from the last layer; a
reconstruction from layer 0 then takes, at each step, the first candidate in (node id, range end)
order that attains the optimum, which realises the tie-breakers exactly. Two cheap boolean passes
first find, per set, the positions it can reach from layer 0 and those from which the other nodes
can still finish; only states in both are evaluated, and a node's possible range ends form a band
as wide as its memory allows. Sets of one size are evaluated together in a few numpy operations, so
the work is about 2^F * F * L * band entries: 8 nodes and 80 layers take well under a second.
Above EXACT_LIMIT free nodes the tables grow too large, and a heuristic takes over: the same
programme over a fixed order of free nodes (each may be used or skipped: O(F * L * band) per
order), tried for a few natural orders (coordinator and fastest first, fastest, largest memory,
nearest, the two largest at the ends) and improved by moving one node elsewhere in the order (an
order that cannot place the model ranks by how much of it it can), for a fixed number of evaluations
(deterministic; not guaranteed optimal, though it matched the exact search on the instances tried).

Determinism: profiles are sorted by node id before anything else and measured links are read by
key, so any permutation of `profiles` (or of the mappings) gives the same assignments, prediction,
reasons and moved_layers; `idle` lists the same nodes in the order they were given (join order).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from .layers import LayerRange
from .placement import Assignment, Footprint, PlacementError, check_fleet, check_pins

Links = Mapping[tuple[str, str], tuple[float, float]]

EXACT_LIMIT = 10  # free nodes up to which the search is exact (2^10 sets: under a second at 80 layers)
HEURISTIC_EVALS = 300  # node orders the heuristic evaluates above EXACT_LIMIT (a count: deterministic)

_NO_LINKS: Links = MappingProxyType({})
_SPAN = 1 << 60  # ticks in the largest cost a route could have
_INF = 1 << 61  # "impossible": above every route's cost (at most _SPAN plus rounding); 3 * _INF fits int64
_I64 = np.int64


@dataclass(frozen=True)
class NodeProfile:
    """A node's measured speed, links and memory, as the planner sees it."""

    node_id: str
    memory: int  # bytes usable for its shard (min of --max-memory cap and free memory)
    decode_s_per_byte: float  # seconds per byte of weights in one single-token decode step
    prefill_s_per_byte: float  # seconds per byte of weights per prompt token, in a full batch
    step_overhead_s: float = 0.0  # fixed cost of one step on this node (graph build, handler)
    rtt_s: float = 0.0  # round trip coordinator <-> node, one-position payload (0 for the coordinator)
    bandwidth_bps: float = float("inf")  # bytes/s coordinator <-> node
    pin: LayerRange | None = None
    is_coordinator: bool = False
    memory_total: int = 0  # for the baselines (exo)
    memory_free: int = 0  # for the baselines (llama.cpp RPC)
    head_s_per_byte: float | None = None  # seconds per byte of the output head in a decode step; None: as blocks


@dataclass(frozen=True)
class Prediction:
    """Predicted time of a route."""

    decode_s: float  # per token
    prefill_s: float  # per n_batch batch

    @property
    def decode_tps(self) -> float:
        """Tokens per second while decoding."""
        return 1.0 / self.decode_s if self.decode_s > 0 else math.inf


@dataclass(frozen=True)
class MeasuredPlan:
    """The chosen route, the nodes left out, its prediction and why each node got what it got."""

    assignments: tuple[Assignment, ...]  # route order = layer order, contiguous, cover 0..n_layer once
    idle: tuple[str, ...]  # node ids left out, in the order given
    prediction: Prediction
    reasons: Mapping[str, str]  # node_id -> one line: why this range, or why left out
    moved_layers: int  # layers whose node differs from `current` (all of them without one)


# ---------------------------------------------------------------- cost model


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms"


def _head_bytes(fp: Footprint) -> int:
    return fp.output_bytes if fp.output_bytes > 0 else fp.embed_bytes  # tied head reads the embeddings


def head_cost_factor(fp: Footprint) -> float:
    """The head's cost per byte relative to the blocks' for a node whose head was not probed: the same
    cost per weight (1 where the footprint has no weight counts).

    A small CPU is bound by the work per weight more than by the bytes: on a 2-core EPYC, Gemma 3
    270M's Q8_0 head (1.06 bytes/weight) cost about what its Q4_K/Q5_0/Q6_K blocks (0.67 bytes/weight)
    cost per weight, and 0.6x their cost per byte (docs/benchmarks.md). Where reading the bytes is the
    bound (many cores, large models), this underestimates a wider head; a probed head replaces it."""
    blocks_b, blocks_w, head_b = sum(fp.layer_bytes), sum(fp.layer_params), _head_bytes(fp)
    if not (blocks_b > 0 and blocks_w > 0 and head_b > 0 and fp.head_params > 0):
        return 1.0
    return (blocks_b / blocks_w) / (head_b / fp.head_params)


def _head_rate(fp: Footprint, p: NodeProfile) -> float:
    if p.head_s_per_byte is not None:
        return p.head_s_per_byte
    return p.decode_s_per_byte * head_cost_factor(fp)


def _hop_s(fp: Footprint, p: NodeProfile, layers: LayerRange, n_batch: int) -> tuple[float, float]:
    """(decode, prefill) compute seconds of node p running `layers`: its blocks, and the head on the last hop."""
    blocks = sum(fp.layer_bytes[layers.start : layers.end])
    head = _head_rate(fp, p) * _head_bytes(fp) if layers.end == fp.n_layer else 0.0
    return (p.step_overhead_s + p.decode_s_per_byte * blocks + head,
            p.step_overhead_s + p.prefill_s_per_byte * blocks * n_batch + head)


def hop_decode_s(footprint: Footprint, profile: NodeProfile, layers: LayerRange) -> float:
    """Predicted compute seconds of one decode step of `layers` on the node of `profile` (no links)."""
    return _hop_s(footprint, profile, layers, 1)[0]


def _measured(links: Links, a: str, b: str) -> tuple[float, float] | None:
    # Both key orders may be present; the sorted one wins so that dict order cannot matter.
    lo, hi = sorted((a, b))
    if (lo, hi) in links:
        return links[(lo, hi)]
    return links.get((hi, lo))


def _link(a: NodeProfile | None, b: NodeProfile, links: Links) -> tuple[float, float]:
    """(rtt_s, bandwidth_bps) of the link a -> b; a None is the coordinator as the route's origin."""
    if a is None:
        return (0.0, math.inf) if b.is_coordinator else (b.rtt_s, b.bandwidth_bps)
    if a.is_coordinator:
        return b.rtt_s, b.bandwidth_bps
    if b.is_coordinator:
        return a.rtt_s, a.bandwidth_bps
    m = _measured(links, a.node_id, b.node_id)
    if m is not None:
        return float(m[0]), float(m[1])
    return a.rtt_s + b.rtt_s, min(a.bandwidth_bps, b.bandwidth_bps)  # as if relayed by the coordinator


def _link_s(rtt: float, bw: float, payload: float) -> float:
    return rtt + (payload / bw if payload else 0.0)


def _check_route(fp: Footprint, by_id: Mapping[str, NodeProfile], assignments: Sequence[Assignment]) -> None:
    pos, seen = 0, set()
    for a in assignments:
        if a.node_id not in by_id:
            raise PlacementError(f"assignment {a.layers} -> {a.node_id} names a node without a profile; profile it")
        if a.node_id in seen:
            raise PlacementError(f"node {a.node_id} appears twice in the route; give each node one range")
        if a.layers.start != pos:
            raise PlacementError(
                f"the route is not contiguous at layer {pos} ({a.node_id} starts at {a.layers.start}); "
                "give assignments in layer order without gaps or overlaps"
            )
        seen.add(a.node_id)
        pos = a.layers.end
    if pos != fp.n_layer:
        raise PlacementError(f"the route covers layers 0:{pos} of {fp.n_layer}; cover every layer once")


def _parts(fp, by_id, route, links, n_batch) -> tuple[float, float, float, float]:
    """(decode compute, decode links, prefill compute, prefill links) of a route of (node, range)."""
    h = fp.n_embd * 4
    dc = dl = pc = pl = 0.0
    prev = None
    for node_id, layers in route:
        p = by_id[node_id]
        rtt, bw = _link(prev, p, links)
        dl += _link_s(rtt, bw, h)
        pl += _link_s(rtt, bw, h * n_batch)
        d, q = _hop_s(fp, p, layers, n_batch)
        dc += d
        pc += q
        prev = p
    return dc, dl, pc, pl


def predict(
    footprint: Footprint,
    profiles: Sequence[NodeProfile],
    assignments: Sequence[Assignment],
    n_batch: int = 512,
    links: Links = _NO_LINKS,
) -> Prediction:
    """Predicted decode latency per token and prefill time per batch of a route (see the module docstring)."""
    by_id = {p.node_id: p for p in profiles}
    _check_route(footprint, by_id, assignments)
    dc, dl, pc, pl = _parts(footprint, by_id, [(a.node_id, a.layers) for a in assignments], links, n_batch)
    return Prediction(dc + dl, pc + pl)


# ---------------------------------------------------------------- baselines


def _proportional(
    fp: Footprint, profiles: Sequence[NodeProfile], weights: list[int], exo: bool
) -> tuple[Assignment, ...]:
    """Contiguous ranges in the given order, sized in proportion to `weights` by exo's or llama.cpp's rounding."""
    n = fp.n_layer
    total = sum(weights)
    if total <= 0:
        weights, total = [1] * len(weights), len(weights)
    cum = np.cumsum(weights)
    if exo:
        # exo: a node's range starts at int(cumulative share before it * n_layer); the last runs to the end.
        starts = [0] + [int(n * int(c) // total) for c in cum[:-1]]
        ends = starts[1:] + [n]
    else:
        # llama.cpp: layer i goes to the first device whose cumulative share exceeds i / n_layer.
        owner = [min(int(np.searchsorted(cum / total, i / n, side="right")), len(weights) - 1) for i in range(n)]
        starts = [owner.index(k) if k in owner else 0 for k in range(len(weights))]
        ends = [n - owner[::-1].index(k) if k in owner else 0 for k in range(len(weights))]
    return tuple(Assignment(p.node_id, LayerRange(s, e)) for p, s, e in zip(profiles, starts, ends) if e > s)


def exo_plan(footprint: Footprint, profiles: Sequence[NodeProfile]) -> tuple[Assignment, ...]:
    """exo's rule: layers in proportion to memory_total, every node, in the given order."""
    return _proportional(footprint, profiles, [p.memory_total for p in profiles], exo=True)


def llamacpp_plan(footprint: Footprint, profiles: Sequence[NodeProfile]) -> tuple[Assignment, ...]:
    """llama.cpp RPC's rule: layers in proportion to memory_free, every node, in the given order."""
    return _proportional(footprint, profiles, [p.memory_free for p in profiles], exo=False)


# ---------------------------------------------------------------- the instance in ticks


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


def _lexmin(d: np.ndarray, p: np.ndarray, m: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lexicographic minimum of (d, p, m) along an axis; infeasible (d >= _INF) comes out all _INF."""
    bd = d.min(axis=axis, keepdims=True)
    tie = d == bd
    bp = np.where(tie, p, _INF).min(axis=axis, keepdims=True)
    tie &= p == bp
    bm = np.where(tie, m, _INF).min(axis=axis, keepdims=True)
    bd, bp, bm = bd.squeeze(axis), bp.squeeze(axis), bm.squeeze(axis)
    dead = bd >= _INF
    if dead.any():
        bd, bp, bm = np.where(dead, _INF, bd), np.where(dead, _INF, bp), np.where(dead, _INF, bm)
    return bd, bp, bm


def _pick(d: np.ndarray, p_of, m_of) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of the 2-D array d, the lexicographically least (decode, prefill, moved)."""
    # Decode alone decides almost always, so the other keys, p_of(rows, cols) and m_of(rows, cols), are
    # evaluated in full only for rows where two columns tie on decode; elsewhere at the argmin only.
    at = d.argmin(axis=1)
    rows = np.arange(d.shape[0])
    bd = d[rows, at]
    tied = np.flatnonzero(((d == bd[:, None]).sum(axis=1) > 1) & (bd < _INF))
    if tied.size:
        r, cols = tied[:, None], np.arange(d.shape[1])[None, :]
        tie = d[tied] == bd[tied][:, None]
        p = np.where(tie, p_of(r, cols), _INF)
        tie &= p == p.min(axis=1, keepdims=True)
        m = np.where(tie, m_of(r, cols), _INF)
        tie &= m == m.min(axis=1, keepdims=True)
        at[tied] = tie.argmax(axis=1)
    bp, bm = p_of(rows, at), m_of(rows, at)
    dead = bd >= _INF
    if dead.any():
        bd, bp, bm = np.where(dead, _INF, bd), np.where(dead, _INF, bp), np.where(dead, _INF, bm)
    return bd, bp, bm


def _gaps(nodes: Sequence[NodeProfile], n_layer: int) -> list[tuple[int, int]]:
    """Maximal runs of layers that no pin covers: where free nodes go."""
    gaps, q = [], 0
    for s, e in sorted((p.pin.start, p.pin.end) for p in nodes if p.pin is not None) + [(n_layer, n_layer)]:
        if s > q:
            gaps.append((q, s))
        q = e
    return gaps


def _memory_table(fp: Footprint, gaps, n_ctx: int, max_sessions: int, n_batch: int) -> np.ndarray:
    """sb[a, b]: resident bytes of a shard a:b, for every range within one gap (others: too big for anyone)."""
    L = fp.n_layer
    sb = np.full((L + 1, L + 1), np.iinfo(_I64).max, dtype=_I64)
    for gs, ge in gaps:
        for a in range(gs, ge):
            for b in range(a + 1, ge + 1):
                sb[a, b] = fp.shard_bytes(LayerRange(a, b), n_ctx, max_sessions, n_batch)
    return sb


class _Instance:
    """Everything the search needs, with costs as exact integer ticks (see the module docstring)."""

    # Node index x is a position in `nodes` (sorted by id); row x + 1 of a value table is "the last hop
    # was x", row 0 is the coordinator before the first hop. Free node j is nodes[free[j]].

    def __init__(self, fp, nodes, sb, n_batch, links, current):
        self.fp, self.nodes, self.sb, self.links, self.n_batch = fp, nodes, sb, links, n_batch
        L = self.L = fp.n_layer
        n = len(nodes)
        self.pins = sorted((p.pin.start, p.pin.end, i) for i, p in enumerate(nodes) if p.pin is not None)
        self.pin_at = {s: (e, i) for s, e, i in self.pins}
        self.free = [i for i, p in enumerate(nodes) if p.pin is None]
        self.gaps = _gaps(nodes, L)

        # Tick sizes: 2^-60 of a bound on any route's cost, separately for decode and prefill.
        h = fp.n_embd * 4
        head = _head_bytes(fp)
        total = sum(fp.layer_bytes) + head
        pair = [[(0.0, 0.0)] * n for _ in range(n + 1)]  # row 0 = the coordinator as origin
        for u in range(n + 1):
            for x in range(n):
                if u - 1 != x:
                    rtt, bw = _link(nodes[u - 1] if u else None, nodes[x], links)
                    pair[u][x] = (_link_s(rtt, bw, h), _link_s(rtt, bw, h * n_batch))
        finite = [c for row in pair for c in row if math.isfinite(c[0]) and math.isfinite(c[1])]
        over = sum(p.step_overhead_s for p in nodes)
        dmax = over + max(max(p.decode_s_per_byte, _head_rate(fp, p)) for p in nodes) * total
        pmax = over + max(p.prefill_s_per_byte * n_batch + _head_rate(fp, p) for p in nodes) * total
        dmax += (n + 1) * max((c[0] for c in finite), default=0.0)
        pmax += (n + 1) * max((c[1] for c in finite), default=0.0)
        td, tp = (dmax or 1.0) / _SPAN, (pmax or 1.0) / _SPAN

        def tick(x: float, t: float) -> int:
            return round(x / t) if math.isfinite(x) else _INF

        self.ld = np.array([[tick(c[0], td) if u - 1 != x else _INF for x, c in enumerate(row)]
                            for u, row in enumerate(pair)], dtype=_I64).reshape(n + 1, n)
        self.lp = np.array([[tick(c[1], tp) if u - 1 != x else _INF for x, c in enumerate(row)]
                            for u, row in enumerate(pair)], dtype=_I64).reshape(n + 1, n)

        # Hop costs, summed per layer so that equally fast nodes give equal sums for any split.
        cur = current or {}
        self.qd, self.qp, self.qm, self.od, self.op, self.hd, self.hp = [], [], [], [], [], [], []
        for p in nodes:
            dl = [tick(p.decode_s_per_byte * b, td) for b in fp.layer_bytes]
            pl = [tick(p.prefill_s_per_byte * b * n_batch, tp) for b in fp.layer_bytes]
            r = cur.get(p.node_id)
            ml = [0 if r is not None and r.start <= i < r.end else 1 for i in range(L)]
            self.qd.append(np.concatenate([[0], np.cumsum(np.array(dl, dtype=_I64))]).astype(_I64))
            self.qp.append(np.concatenate([[0], np.cumsum(np.array(pl, dtype=_I64))]).astype(_I64))
            self.qm.append(np.concatenate([[0], np.cumsum(np.array(ml, dtype=_I64))]).astype(_I64))
            self.od.append(tick(p.step_overhead_s, td))
            self.op.append(tick(p.step_overhead_s, tp))
            self.hd.append(tick(_head_rate(fp, p) * head, td))
            self.hp.append(tick(_head_rate(fp, p) * head, tp))  # logits of the batch's last position only

        # Per free node: which ranges fit, and their costs as (L+1) x (L+1) tables (row start, column end).
        F = len(self.free)
        self.allowed = np.zeros((F, L + 1, L + 1), dtype=bool)
        self.HD, self.HP, self.HM = [], [], []
        for j, x in enumerate(self.free):
            ok = self.allowed[j] = self.sb <= nodes[x].memory
            self.HD.append(np.where(ok, self._table(self.qd[x], self.od[x], self.hd[x]), _INF))
            self.HP.append(np.where(ok, self._table(self.qp[x], self.op[x], self.hp[x]), _INF))
            self.HM.append(np.where(ok, self._table(self.qm[x], 0, 0), _INF))
        # The same costs as bands: from start b, ends b+1 .. b+W, with W the most layers any free node can
        # hold. Memory confines a node to a window of layers, so the bands are much smaller than the tables.
        starts = np.arange(L + 1)[:, None]
        span = np.where(self.allowed, np.arange(L + 1)[None, None, :], -1) - starts[None]
        W = max(int(span.max()) if F else 1, 1)
        reach = starts + np.arange(1, W + 1)[None, :]
        self.ends = np.minimum(reach, L)
        inside = reach <= L
        self.BD, self.BP, self.BM = (
            np.stack([np.where(inside, t[starts, self.ends], _INF) for t in tables]) if F
            else np.zeros((0, L + 1, W), dtype=_I64)
            for tables in (self.HD, self.HP, self.HM)
        )

    def _table(self, q: np.ndarray, over: int, head: int) -> np.ndarray:
        t = over + q[None, :] - q[:, None]
        t[:, self.L] += head
        return t

    def hop(self, x: int, a: int, b: int) -> tuple[int, int, int]:
        """Exact tick costs (decode, prefill, moved) of node x holding layers a:b."""
        end = b == self.L
        return (
            self.od[x] + int(self.qd[x][b] - self.qd[x][a]) + (self.hd[x] if end else 0),
            self.op[x] + int(self.qp[x][b] - self.qp[x][a]) + (self.hp[x] if end else 0),
            int(self.qm[x][b] - self.qm[x][a]),
        )

    def close_pins(self, reach: np.ndarray, idx: np.ndarray) -> None:
        """Reaching a pin's start means reaching its end: the pinned node takes it (rows idx of reach)."""
        for s, e, _ in self.pins:
            reach[idx, e] |= reach[idx, s]

    def close_pins_back(self, fin: np.ndarray, idx: np.ndarray) -> None:
        """Able to finish from a pin's end means able to finish from its start (last pin first)."""
        for s, e, _ in reversed(self.pins):
            fin[idx, s] |= fin[idx, e]

    def apply_pins(self, VD: np.ndarray, VP: np.ndarray, VM: np.ndarray, idx: np.ndarray) -> None:
        """In value tables idx: nothing left to pay at the end, and at a pin's start its node must come next."""
        L = self.L
        VD[idx, :, L] = VP[idx, :, L] = VM[idx, :, L] = 0
        for s, e, x in reversed(self.pins):
            hd, hp, hm = self.hop(x, s, e)
            d = np.minimum(self.ld[None, :, x] + hd + VD[idx, x + 1, e][:, None], _INF)
            dead = d >= _INF
            VD[idx, :, s] = d
            VP[idx, :, s] = np.where(dead, _INF, self.lp[None, :, x] + hp + VP[idx, x + 1, e][:, None])
            VM[idx, :, s] = np.where(dead, _INF, hm + VM[idx, x + 1, e][:, None])

    def inner(self, j, b, VD, VP, VM, t, r):
        """Per candidate k (free node j[k] from layer b[k], then state t[k], r[k]): the best over range ends."""
        # The state after the hop is row r[k] of table t[k] of VD/VP/VM; ends are scanned in the band.
        e = self.ends[b]
        d = self.BD[j, b] + VD[t[:, None], r[:, None], e]  # at most 2 * _INF: no overflow

        def p_of(k, c):
            return self.BP[j[k], b[k], c] + VP[t[k], r[k], self.ends[b[k], c]]

        def m_of(k, c):
            return self.BM[j[k], b[k], c] + VM[t[k], r[k], self.ends[b[k], c]]

        return _pick(d, p_of, m_of)

    def combine(self, d, p, m, xs):
        """Best continuations (Q, len(xs)) through next nodes xs -> the best after every previous hop (Q, K1)."""
        K1 = self.ld.shape[0]
        D = (self.ld[:, xs][None] + d[:, None, :]).reshape(-1, len(xs))
        D = np.minimum(D, _INF)

        def p_of(k, c):
            return self.lp[k % K1, xs[c]] + p[k // K1, c]

        def m_of(k, c):
            return m[k // K1, c]

        return tuple(a.reshape(-1, K1) for a in _pick(D, p_of, m_of))


# ---------------------------------------------------------------- exact search


def _exact(inst: _Instance):
    """Subset DP; (route, None), or (None, (furthest layer reached, set of free nodes that got there))."""
    F, L, K1 = len(inst.free), inst.L, len(inst.nodes) + 1
    masks = np.arange(1 << F)
    bits = ((masks[:, None] >> np.arange(F)[None, :]) & 1).astype(bool)
    size = bits.sum(axis=1)
    levels = [masks[size == k] for k in range(F + 1)]  # sets by size: each level depends on the next only
    A = inst.allowed

    # Forward: reach[S, b] - the nodes of S, each once, in some order, cover layers 0..b (with the pins).
    reach = np.zeros((1 << F, L + 1), dtype=bool)
    reach[0, 0] = True
    inst.close_pins(reach, levels[0])
    for k in range(1, F + 1):
        T = levels[k]
        t, j = np.nonzero(bits[T])  # k members per set, set by set
        before = reach[T[t] ^ (1 << j)]
        step = (A[j] & before[:, :, None]).any(axis=1)
        reach[T] = step.reshape(len(T), k, L + 1).any(axis=1)
        inst.close_pins(reach, T)
    if not reach[:, L].any():
        last = np.where(reach, np.arange(L + 1)[None, :], -1).max(axis=1)
        q = int(last.max())
        far = min(np.flatnonzero(last == q), key=lambda S: (int(size[S]), int(S)))
        return None, (q, int(far))

    # Backward feasibility: fin[C, b] - some of the nodes in C can place layers b.. (with the pins).
    # A state (S, b) matters only if reach[S, b] and fin[all - S, b]: when memory is tight, that leaves
    # a narrow window of b for each set.
    fin = np.zeros((1 << F, L + 1), dtype=bool)
    fin[0, L] = True
    inst.close_pins_back(fin, levels[0])
    for k in range(1, F + 1):
        C = levels[k]
        c, j = np.nonzero(bits[C])
        after = fin[C[c] ^ (1 << j)]
        starts = (A[j] & after[:, None, :]).any(axis=2)
        fin[C] = (after | starts).reshape(len(C), k, L + 1).any(axis=1)
        inst.close_pins_back(fin, C)
    need = reach & fin[((1 << F) - 1) ^ masks]
    need[:, L] = False
    for s, _, _ in inst.pins:
        need[:, s] = False  # the pinned node's turn: apply_pins fills those

    # Backward: VD/VP/VM[S, u, b] - the best (decode, prefill, moved) for placing layers b.. when the
    # free nodes in S are used and the last hop was row u. Sets of one size at a time, all at once.
    VD = np.full((1 << F, K1, L + 1), _INF, dtype=_I64)
    VP, VM = VD.copy(), VD.copy()
    xs = np.array(inst.free, dtype=np.intp)
    for k in range(F, -1, -1):
        Ss = levels[k][reach[levels[k]].any(axis=1)]
        if not Ss.size:
            continue
        s, j = np.nonzero(~bits[Ss])  # each set with each node it could take next
        if s.size:
            p, b = np.nonzero(need[Ss[s]])  # ... starting at each layer that matters for the set
            if p.size:
                s, j = s[p], j[p]
                d, pp, m = inst.inner(j, b, VD, VP, VM, Ss[s] | (1 << j), xs[j] + 1)
                ID = np.full((Ss.size, F, L + 1), _INF, dtype=_I64)
                IP, IM = ID.copy(), ID.copy()
                ID[s, j, b], IP[s, j, b], IM[s, j, b] = d, pp, m
                q, qb = np.nonzero(need[Ss])
                bd, bp, bm = inst.combine(ID[q, :, qb], IP[q, :, qb], IM[q, :, qb], xs)
                VD[Ss[q], :, qb], VP[Ss[q], :, qb], VM[Ss[q], :, qb] = bd, bp, bm
        inst.apply_pins(VD, VP, VM, Ss)

    if VD[0, 0, 0] >= _INF:  # layers can be placed, but only over links that cannot be used
        return None, None
    # Forward reconstruction: the first candidate, in (node id, range end) order, that is optimal.
    route, S, u, b = [], 0, 0, 0
    while b < L:
        if b in inst.pin_at:
            e, x = inst.pin_at[b]
            route.append((x, b, e))
            u, b = x + 1, e
            continue
        want = (int(VD[S, u, b]), int(VP[S, u, b]), int(VM[S, u, b]))
        found = None
        for j, x in enumerate(inst.free):
            if found or S >> j & 1:
                continue
            T = S | 1 << j
            for c in range(b + 1, L + 1):
                if inst.HD[j][b, c] >= _INF:
                    continue
                hd, hp, hm = inst.hop(x, b, c)
                got = (int(inst.ld[u, x]) + hd + int(VD[T, x + 1, c]),
                       int(inst.lp[u, x]) + hp + int(VP[T, x + 1, c]), hm + int(VM[T, x + 1, c]))
                if got == want:
                    found = (j, x, c)
                    break
        j, x, c = found  # some candidate attains the optimum, by construction of the tables
        route.append((x, b, c))
        S, u, b = S | 1 << j, x + 1, c
    return route, None


# ---------------------------------------------------------------- heuristic search (many free nodes)


def _tables(inst: _Instance, order: list[int], base=None, keep: int = 0):
    """Value tables of the DP over a fixed order of free nodes (indices into inst.free), each used or skipped."""
    # T*[i] holds the best costs when nodes order[i:] may still come. With `base`, the tables of an order
    # that agrees with this one from position `keep` on, only positions before `keep` are recomputed.
    L, K1, n = inst.L, len(inst.nodes) + 1, len(order)
    if base is None:
        TD = np.full((n + 1, K1, L + 1), _INF, dtype=_I64)
        TP, TM = TD.copy(), TD.copy()
        inst.apply_pins(TD, TP, TM, np.array([n]))
        keep = n
    else:
        TD, TP, TM = (t.copy() for t in base)
    starts = np.arange(L)
    for i in range(keep - 1, -1, -1):
        j, x = order[i], inst.free[order[i]]
        d, p, m = inst.inner(np.full(L, j), starts, TD, TP, TM, np.full(L, i + 1), np.full(L, x + 1))
        # Use node x here (link from each possible previous hop) or skip it: elementwise lexicographic.
        ud = np.minimum(inst.ld[None, :, x] + d[:, None], _INF).T
        up = (inst.lp[None, :, x] + p[:, None]).T
        um = np.broadcast_to(m[None, :], ud.shape)
        sd, sp, sm = TD[i + 1, :, :L], TP[i + 1, :, :L], TM[i + 1, :, :L]
        use = (ud < _INF) & ((ud < sd) | ((ud == sd) & ((up < sp) | ((up == sp) & (um < sm)))))
        TD[i, :, :L], TP[i, :, :L], TM[i, :, :L] = np.where(use, ud, sd), np.where(use, up, sp), np.where(use, um, sm)
        inst.apply_pins(TD, TP, TM, np.array([i]))
    return TD, TP, TM


def _sequence_route(inst: _Instance, order: list[int], tables) -> list[tuple[int, int, int]]:
    """The route the fixed-order tables lead to (it exists: the caller checked the value is finite)."""
    TD, TP, TM = tables
    L = inst.L
    route, i, u, b = [], 0, 0, 0
    while b < L:
        if b in inst.pin_at:
            e, x = inst.pin_at[b]
            route.append((x, b, e))
            u, b = x + 1, e
            continue
        want = (int(TD[i, u, b]), int(TP[i, u, b]), int(TM[i, u, b]))
        j, x = order[i], inst.free[order[i]]
        for c in range(b + 1, L + 1):
            if inst.HD[j][b, c] >= _INF:
                continue
            hd, hp, hm = inst.hop(x, b, c)
            got = (int(inst.ld[u, x]) + hd + int(TD[i + 1, x + 1, c]),
                   int(inst.lp[u, x]) + hp + int(TP[i + 1, x + 1, c]), hm + int(TM[i + 1, x + 1, c]))
            if got == want:  # using node i is optimal here; otherwise skipping it is
                route.append((x, b, c))
                u, b = x + 1, c
                break
        i += 1
    return route


def _heuristic(inst: _Instance):
    """Fixed-order DP over a few natural orders, improved by moving single nodes; None if none fits."""
    nodes, free = inst.nodes, inst.free
    idx = range(len(free))

    def by(key):
        return sorted(idx, key=lambda j: (key(nodes[free[j]]), nodes[free[j]].node_id))

    def value(tables):
        # An order that cannot place the model ranks by how many of the last layers it could place, so
        # that the local search also climbs towards feasibility.
        can = np.flatnonzero((tables[0][0] < _INF).any(axis=0))
        return tuple(int(t[0, 0, 0]) for t in tables) + (int(can[0]) if can.size else inst.L + 1,)

    starts = [
        by(lambda p: (not p.is_coordinator, p.decode_s_per_byte)),  # coordinator first, then fastest
        by(lambda p: p.decode_s_per_byte),
        by(lambda p: -p.memory),  # largest first: the order in which a greedy fill reaches furthest
        by(lambda p: p.rtt_s),
    ]
    if len(free) > 2:  # the first and last shards carry the embeddings: the two largest at the ends
        largest = starts[2]
        starts.append([largest[0]] + largest[2:] + [largest[1]])
    best = None
    for order in starts:
        tables = _tables(inst, order)
        if best is None or value(tables) < value(best[1]):
            best = (order, tables)
    evals = len(starts)
    # First-improvement local search: move one node elsewhere in the order. Positions after both ends of
    # the move keep their tables. A fixed budget keeps it deterministic (a wall-clock limit would make
    # the plan depend on the machine's load).
    improved = True
    while improved and evals < HEURISTIC_EVALS:
        improved = False
        for i in idx:
            for k in idx:
                if i == k or evals >= HEURISTIC_EVALS:
                    continue
                order = list(best[0])
                order.insert(k, order.pop(i))
                tables = _tables(inst, order, best[1], max(i, k) + 1)
                evals += 1
                if value(tables) < value(best[1]):
                    best, improved = (order, tables), True
    if value(best[1])[0] >= _INF:
        return None
    return _sequence_route(inst, *best)


def _greedy_reach(inst: _Instance) -> tuple[int, int]:
    """How far the free nodes, largest first, each taking all it can, get (for the error message)."""
    used = 0
    order = sorted(range(len(inst.free)), key=lambda j: (-inst.nodes[inst.free[j]].memory, j))
    reach = np.zeros((1, inst.L + 1), dtype=bool)
    reach[0, 0] = True
    one = np.array([0])
    inst.close_pins(reach, one)
    q = int(np.flatnonzero(reach[0]).max())
    for j in order:
        ends = np.flatnonzero(inst.allowed[j][q])
        if q < inst.L and ends.size:
            reach[:] = False
            reach[0, ends.max()] = True
            inst.close_pins(reach, one)
            q, used = int(np.flatnonzero(reach[0]).max()), used | 1 << j
    return q, used


# ---------------------------------------------------------------- the planner


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


def _infeasible(inst: _Instance, q: int, used: int, small: list[str]) -> PlacementError:
    """Which layers cannot be placed (the first run the nodes cannot reach) and about how much is missing."""
    end = min([s for s, _, _ in inst.pins if s > q] + [inst.L])
    need = int(inst.sb[q, end])
    left = [inst.nodes[x] for j, x in enumerate(inst.free) if not used >> j & 1]
    room = max((p.memory for p in left), default=0)
    who = (f"the free nodes ({', '.join(inst.nodes[x].node_id for x in inst.free)}) get no further than layer {q}"
           if inst.free else "no free node is left")
    if small:
        who += f" ({', '.join(small)} cannot hold even one layer)"
    short = (f"about {_mb(max(need - room, 0))} is missing: a shard of those layers needs {_mb(need)} and the "
             f"largest node left has {_mb(room)}" if left
             else f"about {_mb(need)} is missing: a shard of those layers needs that much and no node is left")
    return PlacementError(f"cannot place layers {q}:{end}: {who}; {short}; join another node or raise --max-memory")


def _why_idle(inst, by_id, route, base, pinned_ids, p: NodeProfile) -> str:
    """Why a node with enough memory for some layers is not in the route: its best local insertion."""
    fp, n_batch = inst.fp, inst.n_batch
    dc0, dl0, _, _ = base
    best = None
    for k, (v, r) in enumerate(route):
        if v in pinned_ids:
            continue
        options = [((p.node_id, r),)]  # take over v's whole range
        for cut in range(r.start + 1, r.end):
            options.append(((p.node_id, LayerRange(r.start, cut)), (v, LayerRange(cut, r.end))))
            options.append(((v, LayerRange(r.start, cut)), (p.node_id, LayerRange(cut, r.end))))
        for opt in options:
            if any(inst.sb[x.start, x.end] > by_id[n].memory for n, x in opt):
                continue
            new = route[:k] + list(opt) + route[k + 1 :]
            dc, dl, _, _ = _parts(fp, by_id, new, inst.links, n_batch)
            if best is None or dc + dl < best[0] + best[1]:
                best = (dc, dl)
    if best is None:
        return f"left out: no range beside the planned shards fits in its {_mb(p.memory)}"
    dc, dl = best[0] - dc0, best[1] - dl0
    if abs(dc + dl) <= 1e-12 * (dc0 + dl0):
        return "left out: using it would not make a token faster; the tie-breakers chose the others"
    if dc + dl < 0:  # only possible when the heuristic search ran
        return f"left out by the heuristic search for many nodes; using it might save {_ms(-(dc + dl))} per token"
    if dc < 0:
        return f"left out: its {_ms(dl)} link would cost more than the {_ms(-dc)} of compute it saves"
    if dl > 0:
        return (f"left out: at {p.decode_s_per_byte * 1e9:.2g} ns/byte it saves no compute, "
                f"and its link would add {_ms(dl)} per token")
    return f"left out: at {p.decode_s_per_byte * 1e9:.2g} ns/byte it would add {_ms(dc + dl)} per token"


def plan_measured(
    footprint: Footprint,
    profiles: Sequence[NodeProfile],
    n_ctx: int,
    max_sessions: int,
    n_batch: int = 512,
    links: Links = _NO_LINKS,
    current: Mapping[str, LayerRange] | None = None,
) -> MeasuredPlan:
    """The route with the lowest predicted decode latency (tie-breakers in the module docstring)."""
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
            reasons[p.node_id] = (
                f"left out: {_mb(p.memory)} is not enough for one layer "
                f"(the smallest shard needs about {_mb(smallest)})"
                if gaps else "left out: the pinned nodes hold every layer"
            )
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
        p = by_id[a.node_id]
        first = f"layers {a.layers}: {p.decode_s_per_byte * 1e9:.2g} ns/byte"
        if len(rates) > 1 and p.decode_s_per_byte == rates[0] < rates[1]:
            first += ", the fastest"
        parts = [first]
        if a.node_id in pinned_ids:
            parts.append("pinned there")
        if a.layers.end == L and a.layers.start > 0:
            parts.append("carries the output head")
        need = fp.shard_bytes(a.layers, n_ctx, max_sessions, n_batch)
        parts.append(f"uses {100 * need / p.memory:.0f}% of its memory")
        reasons[a.node_id] = "; ".join(parts)
    route_ = [(a.node_id, a.layers) for a in assignments]
    base = _parts(fp, by_id, route_, links, n_batch)
    for p in nodes:
        if p.node_id not in used and p.node_id not in reasons:
            reasons[p.node_id] = _why_idle(inst, by_id, route_, base, pinned_ids, p)

    idle = tuple(p.node_id for p in profiles if p.node_id not in used)  # join order, like placement.plan
    ordered = {p.node_id: reasons[p.node_id] for p in nodes}  # id order: independent of the input order
    return MeasuredPlan(assignments, idle, prediction, MappingProxyType(ordered), moved)
