"""The exact search: a dynamic programme over the sets of free nodes, for up to EXACT_LIMIT of them.

With F free nodes, a dynamic programme over states (set of free nodes used so far, last hop, next
layer to place) is exact, because the cost of the rest of a route depends only on those three: the
set keeps each node to one shard, the last hop prices the next link, and the position fixes the
memory roles (first/last shards carry embeddings). It runs backwards from the last layer; a
reconstruction from layer 0 then takes, at each step, the first candidate in (node id, range end)
order that attains the optimum, which realises the tie-breakers exactly. Two cheap boolean passes
first find, per set, the positions it can reach from layer 0 and those from which the other nodes
can still finish; only states in both are evaluated, and a node's possible range ends form a band
as wide as its memory allows. Sets of one size are evaluated together in a few numpy operations, so
the work is about 2^F * F * L * band entries: 8 nodes and 80 layers take well under a second.
"""

from __future__ import annotations

import numpy as np

from .instance import _I64, _INF, _Instance


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
