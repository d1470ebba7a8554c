"""The instance the searches work on: a fleet and a model as tables of exact integer costs.

Costs are compared as exact integers: every term is rounded to a tick of 2^-60 of a bound on any
route's cost, compute per layer, so that equal measurements give exactly equal costs (two equal
nodes, or a boundary moved between equally fast nodes, tie exactly and the tie-breakers decide),
while all the rounding in a route stays below (L + 2 * nodes) * 2^-61 of that bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..layers import LayerRange
from ..placement import Footprint
from .cost import NodeProfile, _head_bytes, _head_rate, _link, _link_s

_SPAN = 1 << 60  # ticks in the largest cost a route could have
_INF = 1 << 61  # "impossible": above every route's cost (at most _SPAN plus rounding); 3 * _INF fits int64
_I64 = np.int64


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
