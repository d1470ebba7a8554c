"""The search for many free nodes: the dynamic programme over a few fixed orders of the nodes.

Above EXACT_LIMIT free nodes the tables of the exact search grow too large, and a heuristic takes
over: the same programme over a fixed order of free nodes (each may be used or skipped: O(F * L *
band) per order), tried for a few natural orders (coordinator and fastest first, fastest, largest
memory, nearest, the two largest at the ends) and improved by moving one node elsewhere in the order
(an order that cannot place the model ranks by how much of it it can), for a fixed number of
evaluations (deterministic; not guaranteed optimal, though it matched the exact search on the
instances tried).
"""

from __future__ import annotations

import numpy as np

from .instance import _I64, _INF, _Instance

HEURISTIC_EVALS = 300  # node orders the heuristic evaluates above EXACT_LIMIT (a count: deterministic)


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
