"""The cost model (one function, `predict`): the predicted time of a route, per token and per prompt batch.

A route is the assignments in layer order; the coordinator drives each token step as a chain of
nested calls coordinator -> hop 1 -> hop 2 -> ... -> last hop.

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
