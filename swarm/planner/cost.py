"""The cost model (one function, `predict`): the predicted time of a route, per token and per prompt batch.

A route is the assignments in layer order; the coordinator drives each token step as a chain of
nested calls coordinator -> hop 1 -> hop 2 -> ... -> last hop.

* compute bytes of a range = its blocks' weights, plus the output head if the range is the last one
  (output.weight, or the token embeddings when the head is tied to them); the first shard's
  embedding lookup reads one row and is left out.
* a hop costs step_overhead_s + decode_s_per_byte * compute bytes per decoded token, and
  step_overhead_s + prefill_s_per_byte * compute bytes * n_batch per prompt batch of n_batch tokens.
* a link costs rtt + payload / bandwidth, with payload = n_embd * 4 bytes (one position of f32 hidden
  state) per decoded token and n_batch times that per prompt batch. The links of a route are:
  coordinator -> first hop (free when the first hop is the coordinator itself), then each consecutive
  pair. A link between the coordinator and node x is x's own (rtt_s, bandwidth_bps). A link between
  two other nodes is the measured one from `links` (either key order), else it is estimated as going
  through the coordinator: rtt_a + rtt_b and the smaller bandwidth (conservative).
* decode latency = sum of hops + sum of links; prefill time likewise with the prefill terms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from ..layers import LayerRange
from ..placement import Assignment, Footprint, PlacementError

Links = Mapping[tuple[str, str], tuple[float, float]]

_NO_LINKS: Links = MappingProxyType({})


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


@dataclass(frozen=True)
class Prediction:
    """Predicted time of a route."""

    decode_s: float  # per token
    prefill_s: float  # per n_batch batch

    @property
    def decode_tps(self) -> float:
        """Tokens per second while decoding."""
        return 1.0 / self.decode_s if self.decode_s > 0 else math.inf


def _head_bytes(fp: Footprint) -> int:
    return fp.output_bytes if fp.output_bytes > 0 else fp.embed_bytes  # tied head reads the embeddings


def _compute_bytes(fp: Footprint, layers: LayerRange) -> int:
    """Weights a hop reads per token: its blocks, plus the output head on the last hop."""
    return sum(fp.layer_bytes[layers.start : layers.end]) + (_head_bytes(fp) if layers.end == fp.n_layer else 0)


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
        cb = _compute_bytes(fp, layers)
        dc += p.step_overhead_s + p.decode_s_per_byte * cb
        pc += p.step_overhead_s + p.prefill_s_per_byte * cb * n_batch
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
