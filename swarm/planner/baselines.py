"""The reference planners: exo's and llama.cpp RPC's rules, layers in proportion to each node's memory.

They ignore speed and links; tests and benchmarks compare the measured planner against them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..layers import LayerRange
from ..placement import Assignment, Footprint
from .cost import NodeProfile


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
