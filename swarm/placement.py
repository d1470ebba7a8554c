"""Decide which node holds which layers: a model's memory footprint and a deterministic planner.

The footprint reads only GGUF metadata and estimates what a shard of any layer range keeps resident
(weights by role, KV cache, compute buffers). The planner keeps pinned ranges, spreads the remaining
layers over the other nodes in proportion to their memory, and moves layers off nodes whose shard
would not fit. It is a pure function: the same footprint and fleet always give the same plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ModelFileError, SwarmError
from .gguf_file import GGUFFile
from .layers import LayerRange, ShardRole
from .slicing import META_PREFIX, PLANNED_BATCH, model_layer_count

MiB = 1 << 20
LLAMA_OVERHEAD = 48 * MiB  # llama.cpp's own allocations besides weights, KV and compute buffers


class PlacementError(SwarmError):
    """The fleet cannot hold the model as asked; the message says what is missing and what to do."""


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@dataclass(frozen=True)
class Footprint:
    """Byte sizes of a model's parts, enough to estimate any shard's resident memory."""

    n_layer: int
    layer_bytes: tuple[int, ...]  # weights of blk.i.* per layer
    embed_bytes: int  # token_embd.weight
    embed_row_bytes: int  # one row of it (middle shards keep one row)
    output_bytes: int  # output.weight if the model has a separate one, else 0
    norm_bytes: int  # output_norm and other small non-block tensors
    kv_bytes_per_position: tuple[int, ...]  # per layer, f16 K+V
    n_vocab: int
    n_embd: int
    layer_params: tuple[int, ...] = ()  # weights (elements) of blk.i.* per layer; () if unknown
    head_params: int = 0  # weights of the output head (output.weight, or the tied token embeddings)

    def lookahead(self, layers: LayerRange) -> int:
        """1 if the slicer gives this range a look-ahead block (same rule as slicing._choose_lookahead)."""
        if layers.role(self.n_layer) != ShardRole.FIRST:
            return 0
        return 1 if self.layer_bytes[layers.end] < self.n_vocab * PLANNED_BATCH * 4 else 0

    def shard_bytes(self, layers: LayerRange, n_ctx: int, max_sessions: int, n_batch: int = 512) -> int:
        """Estimated resident bytes of a shard holding `layers`: weights, KV and compute buffers."""
        role = layers.role(self.n_layer)
        ahead = self.lookahead(layers)
        # The look-ahead block is a real block of the shard model: llama.cpp loads it and gives it KV.
        stored = slice(layers.start, layers.end + ahead)
        weights = sum(self.layer_bytes[stored]) + self.norm_bytes
        weights += self.embed_row_bytes if role == ShardRole.MIDDLE else self.embed_bytes
        if role.gives_logits:
            weights += self.output_bytes
        kv = sum(self.kv_bytes_per_position[stored]) * n_ctx * max_sessions
        compute = n_batch * self.n_embd * 4 * 16 + LLAMA_OVERHEAD
        if role.gives_logits:
            compute += self.n_vocab * 4 * 2
        elif role == ShardRole.FIRST and not ahead:
            compute += self.n_vocab * n_batch * 4  # without the block llama.cpp keeps a row of logits per token
        return weights + kv + compute


def _per_layer(model: GGUFFile, key: str, default: list[int], n_layer: int) -> list[int]:
    value = model.get(key)
    if value is None:
        return default
    if isinstance(value, (list, tuple)):
        if len(value) != n_layer:
            raise ModelFileError(f"{model.path.name}: {key} has {len(value)} entries for {n_layer} layers")
        return [int(v) for v in value]
    return [int(value)] * n_layer


def footprint(model: GGUFFile) -> Footprint:
    """The footprint of an unsliced model, from its tensor table and metadata only."""
    if META_PREFIX + "layer_start" in model.kvs:
        raise ModelFileError(f"{model.path.name} is a shard; plan with the original model file")
    n_layer = model_layer_count(model)
    arch = model.arch
    n_embd = int(model.get(f"{arch}.embedding_length", 0) or 0)
    layer_bytes = [0] * n_layer
    layer_params = [0] * n_layer
    embed = output = norm = 0
    embed_params = output_params = 0
    embed_row = n_vocab = 0
    for t in model.tensors:
        if t.name.startswith("blk."):
            i = int(t.name.split(".")[1])
            if i < n_layer:
                layer_bytes[i] += t.nbytes
                layer_params[i] += math.prod(t.shape)
        elif t.name == "token_embd.weight":
            embed, embed_row, n_vocab = t.nbytes, t.row_bytes, t.shape[1]
            embed_params = math.prod(t.shape)
        elif t.name == "output.weight":
            output, output_params = t.nbytes, math.prod(t.shape)
        else:
            norm += t.nbytes
    if not embed:
        raise ModelFileError(f"{model.path.name} has no token_embd.weight; is it a language model GGUF?")
    heads = _per_layer(model, f"{arch}.attention.head_count", [1] * n_layer, n_layer)
    heads_kv = _per_layer(model, f"{arch}.attention.head_count_kv", heads, n_layer)
    k_len = model.get(f"{arch}.attention.key_length")
    v_len = model.get(f"{arch}.attention.value_length")
    kv = []
    for h, h_kv in zip(heads, heads_kv):
        head_dim = n_embd // h if h else 0
        k = int(k_len) if k_len is not None else head_dim
        v = int(v_len) if v_len is not None else head_dim
        # Conservative: sliding-window layers are counted with the full context, like dense ones.
        kv.append(2 * (k * h_kv + v * h_kv))
    return Footprint(n_layer, tuple(layer_bytes), embed, embed_row, output, norm, tuple(kv), n_vocab, n_embd,
                     tuple(layer_params), output_params if output else embed_params)


@dataclass(frozen=True)
class NodeSpec:
    """A node offering memory for one shard, optionally pinned to a layer range."""

    node_id: str
    memory: int  # bytes this node may use for its shard (already min(cap, available))
    pin: LayerRange | None = None  # the user pinned this node's range (--layers)


@dataclass(frozen=True)
class Assignment:
    """One node's shard."""

    node_id: str
    layers: LayerRange


@dataclass(frozen=True)
class Plan:
    """Shards in route (layer) order, and the nodes left without layers."""

    assignments: tuple[Assignment, ...]
    idle: tuple[str, ...]

    def route(self) -> tuple[Assignment, ...]:
        """The order hidden states travel: by layer start."""
        return self.assignments


def describe(plan: Plan) -> str:
    """One line such as '0:6 -> n1, 6:12 -> n2, 12:18 -> n3'."""
    text = ", ".join(f"{a.layers} -> {a.node_id}" for a in plan.assignments)
    return text + (f" (idle: {', '.join(plan.idle)})" if plan.idle else "")


Cost = Callable[[int, int], int]


def _feasible(gap: LayerRange, nodes: list[NodeSpec], cost: Cost) -> list[list[bool]]:
    """can[i][q - start]: nodes[i:] in this order can cover layers q..end of the gap (each may take none)."""
    s, e, k = gap.start, gap.end, len(nodes)
    can = [[False] * (e - s + 1) for _ in range(k + 1)]
    can[k][e - s] = True
    for i in reversed(range(k)):
        for q in range(s, e + 1):
            can[i][q - s] = can[i + 1][q - s] or any(
                can[i + 1][b - s] and cost(q, b) <= nodes[i].memory for b in range(q + 1, e + 1)
            )
    return can


def _quotas(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` with largest-remainder rounding (ties to the earlier)."""
    w_sum = sum(weights)
    if w_sum <= 0:
        weights, w_sum = [1] * len(weights), len(weights)
    base = [total * w // w_sum for w in weights]
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % w_sum), i))
    for i in order[: total - sum(base)]:
        base[i] += 1
    return base


def _layout(gap: LayerRange, nodes: list[NodeSpec], cost: Cost) -> list[LayerRange | None]:
    """Each node's range in the gap: closest to the proportional cut that still lets every shard fit."""
    can = _feasible(gap, nodes, cost)
    s, e = gap.start, gap.end
    targets, acc = [], s
    for quota in _quotas(gap.count, [n.memory for n in nodes]):
        acc += quota
        targets.append(acc)
    out: list[LayerRange | None] = []
    q = s
    for i, node in enumerate(nodes):
        # Ends this node may take: its shard fits and the nodes after it can still cover the rest.
        # Following the cumulative target passes an overfull node's layers on to its neighbours.
        ends = [b for b in range(q, e + 1) if can[i + 1][b - s] and (b == q or cost(q, b) <= node.memory)]
        b = min(ends, key=lambda b: (abs(b - targets[i]), b))
        out.append(LayerRange(q, b) if b > q else None)
        q = b
    return out


def _shortfall(gap: LayerRange, nodes: list[NodeSpec], cost: Cost) -> PlacementError:
    """Explain which layers of the gap the nodes cannot hold and about how much more memory is needed."""
    q = gap.start
    for node in nodes:  # each takes as many layers as fit, to find where the fleet runs out
        q = max([b for b in range(q + 1, gap.end + 1) if cost(q, b) <= node.memory], default=q)
    rest = LayerRange(q, gap.end) if q < gap.end else gap
    have = sum(n.memory for n in nodes)
    names = ", ".join(n.node_id for n in nodes)
    who = f"the free nodes ({names}) have {_mb(have)} in all" if nodes else "no free node is left"
    return PlacementError(
        f"cannot place layers {rest}: {who}, and a shard of those layers alone needs about "
        f"{_mb(cost(rest.start, rest.end))} more; join another node or raise --max-memory"
    )


def check_fleet(ids: Sequence[str], n_ctx: int, max_sessions: int, n_batch: int) -> None:
    """Refuse an empty fleet, repeated node ids and non-positive context settings."""
    if not ids:
        raise PlacementError("no nodes to place the model on; start at least one node")
    if n_ctx < 1 or max_sessions < 1 or n_batch < 1:
        raise PlacementError(f"n_ctx, max_sessions and n_batch must be positive: {n_ctx}, {max_sessions}, {n_batch}")
    dupes = sorted({i for i in ids if list(ids).count(i) > 1})
    if dupes:
        raise PlacementError(f"node ids must be unique; {', '.join(dupes)} joined more than once")


def check_pins(nodes: Sequence, n_layer: int, need: Callable[[int, int], int]) -> list:
    """The pinned nodes in layer order, after refusing pins outside the model, overlapping, or too big.

    `nodes` have node_id, pin and memory; `need(start, end)` is the memory a shard of that range needs.
    """
    pinned = sorted((n for n in nodes if n.pin is not None), key=lambda n: n.pin)
    for n in pinned:
        if n.pin.end > n_layer:
            raise PlacementError(
                f"node {n.node_id} is pinned to layers {n.pin}, outside the model, which has {n_layer} layers; "
                f"pin a range within 0:{n_layer}"
            )
    for a, b in zip(pinned, pinned[1:]):
        if b.pin.start < a.pin.end:
            raise PlacementError(
                f"pinned ranges overlap: node {a.node_id} has {a.pin} and node {b.node_id} has {b.pin}; "
                "every layer must belong to one node, so change one of the --layers ranges"
            )
    for n in pinned:
        size = need(n.pin.start, n.pin.end)
        if size > n.memory:
            raise PlacementError(
                f"node {n.node_id} is pinned to layers {n.pin}, which need about {_mb(size)}, but it has "
                f"{_mb(n.memory)}; pin fewer layers or raise its --max-memory"
            )
    return pinned


def plan(
    footprint: Footprint, nodes: Sequence[NodeSpec], n_ctx: int, max_sessions: int, n_batch: int = 512
) -> Plan:
    """Assign every layer to exactly one node; nodes are given in join order (the coordinator first)."""
    n_layer = footprint.n_layer
    check_fleet([n.node_id for n in nodes], n_ctx, max_sessions, n_batch)
    memo: dict[tuple[int, int], int] = {}

    def cost(a: int, b: int) -> int:
        if (a, b) not in memo:
            memo[(a, b)] = footprint.shard_bytes(LayerRange(a, b), n_ctx, max_sessions, n_batch)
        return memo[(a, b)]

    pinned = check_pins(nodes, n_layer, cost)

    gaps, q = [], 0  # maximal runs of layers no pin covers
    for start, end in [(n.pin.start, n.pin.end) for n in pinned] + [(n_layer, n_layer)]:
        if start > q:
            gaps.append(LayerRange(q, start))
        q = end
    free = [n for n in nodes if n.pin is None]
    join = {n.node_id: i for i, n in enumerate(nodes)}

    def holds_one(node: NodeSpec, gap: LayerRange) -> bool:
        return any(cost(i, i + 1) <= node.memory for i in range(gap.start, gap.end))

    # Each gap in layer order takes free nodes in join order until it can be covered.
    crews: list[list[NodeSpec]] = []
    for gap in gaps:
        crew: list[NodeSpec] = []
        while not _feasible(gap, crew, cost)[0][0]:
            fit = [n for n in free if holds_one(n, gap)]
            if not fit:
                raise _shortfall(gap, crew, cost)
            crew.append(fit[0])
            free.remove(fit[0])
        crews.append(crew)
    # Nodes left over go where the most layers per node remain (with one gap: all of them to it).
    for node in list(free):
        options = [g for g in range(len(gaps)) if holds_one(node, gaps[g])]
        if options:
            g = max(options, key=lambda g: (gaps[g].count / len(crews[g]), -g))
            crews[g].append(node)
            free.remove(node)

    assignments = [Assignment(n.node_id, n.pin) for n in pinned]
    used = {n.node_id for n in pinned}
    for gap, crew in zip(gaps, crews):
        crew.sort(key=lambda n: join[n.node_id])  # adding a node, wherever it goes, keeps a cover possible
        for node, layers in zip(crew, _layout(gap, crew, cost)):
            if layers is not None:
                assignments.append(Assignment(node.node_id, layers))
                used.add(node.node_id)
    assignments.sort(key=lambda a: a.layers.start)
    idle = tuple(n.node_id for n in nodes if n.node_id not in used)
    return Plan(tuple(assignments), idle)
