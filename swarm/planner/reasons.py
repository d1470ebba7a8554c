"""The planner's explanations: why each node got its range or was left out, and why a model does not fit.

Each is one line for `swarm status`; an error says which layers cannot be placed and what to do.
"""

from __future__ import annotations

from ..layers import LayerRange
from ..placement import Footprint, PlacementError
from .cost import NodeProfile, _parts
from .instance import _Instance


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _ms(s: float) -> str:
    return f"{s * 1e3:.3g} ms"


def _why_placed(fp: Footprint, p: NodeProfile, layers: LayerRange, rates: list[float], pinned: bool,
                need: int) -> str:
    """Why a node in the route holds its range: its speed among the route's (`rates`, sorted), pins, memory."""
    first = f"layers {layers}: {p.decode_s_per_byte * 1e9:.2g} ns/byte"
    if len(rates) > 1 and p.decode_s_per_byte == rates[0] < rates[1]:
        first += ", the fastest"
    parts = [first]
    if pinned:
        parts.append("pinned there")
    if layers.end == fp.n_layer and layers.start > 0:
        parts.append("carries the output head")
    parts.append(f"uses {100 * need / p.memory:.0f}% of its memory")
    return "; ".join(parts)


def _why_small(p: NodeProfile, smallest: int, gaps: bool) -> str:
    """Why a node too small for any free range is out before the search (`gaps`: some layers are not pinned)."""
    return (
        f"left out: {_mb(p.memory)} is not enough for one layer "
        f"(the smallest shard needs about {_mb(smallest)})"
        if gaps else "left out: the pinned nodes hold every layer"
    )


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
