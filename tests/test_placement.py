"""The placement planner: pure logic on synthetic footprints, plus the real Gemma 3 270M model's footprint."""

from __future__ import annotations

import random

import pytest

from swarm.errors import SwarmError
from swarm.errors import ModelFileError
from swarm.gguf_file import KV, GGUFFile, TensorInfo, read_gguf
from swarm.layers import LayerRange
from swarm.placement import (
    LLAMA_OVERHEAD,
    Assignment,
    Footprint,
    NodeSpec,
    Plan,
    PlacementError,
    describe,
    footprint,
    plan,
)

MB = 1_000_000
GB = 1_000 * MB
N_CTX, SESSIONS = 512, 1


def fake(n_layer: int = 18, layer: int = 10 * MB, embed: int = 178 * MB, output: int = 0) -> Footprint:
    """Gemma-3-270M-like proportions: a big vocabulary, small blocks."""
    return Footprint(
        n_layer=n_layer,
        layer_bytes=(layer,) * n_layer,
        embed_bytes=embed,
        embed_row_bytes=680,
        output_bytes=output,
        norm_bytes=2560,
        kv_bytes_per_position=(1024,) * n_layer,
        n_vocab=262144,
        n_embd=640,
    )


FP = fake()


def cost(fp: Footprint, r: LayerRange) -> int:
    return fp.shard_bytes(r, N_CTX, SESSIONS)


def check(fp: Footprint, nodes: list[NodeSpec], p: Plan) -> None:
    """Every layer exactly once, in route order, each shard within its node's memory, every node accounted."""
    mem = {n.node_id: n.memory for n in nodes}
    assert p.route() == p.assignments
    pos = 0
    for a in p.assignments:
        assert a.layers.start == pos
        assert cost(fp, a.layers) <= mem[a.node_id], (a, mem[a.node_id])
        pos = a.layers.end
    assert pos == fp.n_layer
    named = [a.node_id for a in p.assignments] + list(p.idle)
    assert sorted(named) == sorted(mem)
    assert list(p.idle) == [n.node_id for n in nodes if n.node_id in p.idle]  # join order


def counts(p: Plan) -> list[int]:
    return [a.layers.count for a in p.assignments]


def test_shard_bytes_by_role():
    fixed = 512 * 640 * 4 * 16 + LLAMA_OVERHEAD
    kv = 1024 * N_CTX
    logits = 262144 * 8
    assert cost(FP, LayerRange(0, 18)) == 180 * MB + 178 * MB + 2560 + 18 * kv + fixed + logits
    # First: full embeddings and a look-ahead copy of layer 6 (with its KV), no logits.
    assert cost(FP, LayerRange(0, 6)) == 70 * MB + 178 * MB + 2560 + 7 * kv + fixed
    assert cost(FP, LayerRange(6, 12)) == 60 * MB + 680 + 2560 + 6 * kv + fixed
    assert cost(FP, LayerRange(12, 18)) == 60 * MB + 178 * MB + 2560 + 6 * kv + fixed + logits
    with_output = fake(output=50 * MB)
    assert cost(with_output, LayerRange(12, 18)) - cost(FP, LayerRange(12, 18)) == 50 * MB
    assert cost(with_output, LayerRange(0, 6)) == cost(FP, LayerRange(0, 6))  # first shards drop output.weight
    # KV grows with context and sessions.
    assert FP.shard_bytes(LayerRange(6, 12), 2048, 4) - cost(FP, LayerRange(6, 12)) == 6 * 1024 * (2048 * 4 - N_CTX)


def test_single_node_holds_all():
    p = plan(FP, [NodeSpec("n1", 10 * GB)], N_CTX, SESSIONS)
    assert p.assignments == (Assignment("n1", LayerRange(0, 18)),)
    assert p.idle == ()
    assert describe(p) == "0:18 -> n1"


def test_equal_nodes_split_evenly():
    nodes = [NodeSpec(f"n{i}", 1 * GB) for i in (1, 2, 3)]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert describe(p) == "0:6 -> n1, 6:12 -> n2, 12:18 -> n3"


def test_split_in_proportion_to_memory():
    nodes = [NodeSpec("a", 2 * GB), NodeSpec("b", 4 * GB), NodeSpec("c", 6 * GB)]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert counts(p) == [3, 6, 9]
    # Largest remainder: 18 * (1, 1, 1, 2) / 5 = 3.6, 3.6, 3.6, 7.2 -> 4, 4, 3, 7.
    nodes = [NodeSpec("a", GB), NodeSpec("b", GB), NodeSpec("c", GB), NodeSpec("d", 2 * GB)]
    assert counts(plan(FP, nodes, N_CTX, SESSIONS)) == [4, 4, 3, 7]


def test_caps_force_a_split():
    whole = cost(FP, LayerRange(0, 18))
    nodes = [NodeSpec("n1", whole - 1), NodeSpec("n2", whole - 1)]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert len(p.assignments) == 2


def test_overfull_ends_give_layers_to_the_middle():
    # Equal memory, but first and last carry the 178 MB embeddings: an even 6/6/6 cut does not fit them.
    memory = cost(FP, LayerRange(0, 4))
    assert cost(FP, LayerRange(0, 6)) > memory
    nodes = [NodeSpec(f"n{i}", memory) for i in (1, 2, 3)]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert counts(p)[1] > 6
    assert counts(p) == [4, 10, 4]


def test_pins_kept_and_others_fill_the_gap():
    nodes = [NodeSpec("n1", GB), NodeSpec("n2", GB, pin=LayerRange(0, 4)), NodeSpec("n3", GB)]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert describe(p) == "0:4 -> n2, 4:11 -> n1, 11:18 -> n3"


def test_pins_in_the_middle_leave_two_gaps():
    nodes = [
        NodeSpec("a", GB), NodeSpec("p", GB, pin=LayerRange(4, 6)), NodeSpec("b", GB),
        NodeSpec("c", GB), NodeSpec("d", GB),
    ]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert Assignment("p", LayerRange(4, 6)) in p.assignments
    # Gap 0:4 gets a, gap 6:18 gets b; c and d go to the gap with more layers per node (6:18).
    assert describe(p) == "0:4 -> a, 4:6 -> p, 6:10 -> b, 10:14 -> c, 14:18 -> d"


def test_everything_pinned_leaves_free_nodes_idle():
    nodes = [NodeSpec("a", GB, LayerRange(0, 9)), NodeSpec("b", GB), NodeSpec("c", GB, LayerRange(9, 18))]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert p.idle == ("b",)
    assert describe(p) == "0:9 -> a, 9:18 -> c (idle: b)"


def test_overlapping_pins_refused():
    nodes = [NodeSpec("alpha", GB, LayerRange(0, 10)), NodeSpec("beta", GB, LayerRange(8, 18))]
    with pytest.raises(PlacementError, match="overlap") as e:
        plan(FP, nodes, N_CTX, SESSIONS)
    assert "alpha" in str(e.value) and "beta" in str(e.value)
    assert isinstance(e.value, SwarmError)


def test_pin_outside_model_refused():
    with pytest.raises(PlacementError, match="outside the model.*18 layers"):
        plan(FP, [NodeSpec("a", GB, LayerRange(10, 20))], N_CTX, SESSIONS)


def test_pin_too_big_for_node_refused():
    expected = r"node a is pinned to layers 0:18, which need about [\d.]+ MB, but it has 100.0 MB"
    with pytest.raises(PlacementError, match=expected):
        plan(FP, [NodeSpec("a", 100 * MB, LayerRange(0, 18))], N_CTX, SESSIONS)


def test_too_little_memory_refused_with_help():
    nodes = [NodeSpec("n1", 300 * MB), NodeSpec("n2", 300 * MB)]
    with pytest.raises(PlacementError) as e:
        plan(FP, nodes, N_CTX, SESSIONS)
    msg = str(e.value)
    assert "cannot place layers" in msg and "MB" in msg
    assert "join another node" in msg and "--max-memory" in msg
    # Adding the memory the message asks for, as one more node, makes the model fit.
    need = int(float(msg.split("needs about ")[1].split(" MB")[0]) * MB) + MB
    check(FP, nodes + [NodeSpec("n3", need)], plan(FP, nodes + [NodeSpec("n3", need)], N_CTX, SESSIONS))


def test_gap_with_no_free_node_refused():
    with pytest.raises(PlacementError, match="cannot place layers 9:18"):
        plan(FP, [NodeSpec("a", GB, LayerRange(0, 9))], N_CTX, SESSIONS)


def test_bad_fleets_refused():
    with pytest.raises(PlacementError, match="no nodes"):
        plan(FP, [], N_CTX, SESSIONS)
    with pytest.raises(PlacementError, match="unique"):
        plan(FP, [NodeSpec("a", GB), NodeSpec("a", GB)], N_CTX, SESSIONS)


def test_idle_nodes():
    nodes = [NodeSpec(f"n{i:02d}", GB) for i in range(20)]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    check(FP, nodes, p)
    assert len(p.assignments) == 18 and len(p.idle) == 2
    # A node too small for any layer stays idle; the rest still place the model.
    nodes = [NodeSpec("tiny", 10 * MB), NodeSpec("big", GB)]
    p = plan(FP, nodes, N_CTX, SESSIONS)
    assert describe(p) == "0:18 -> big (idle: tiny)"


def test_deterministic():
    rng = random.Random(7)
    nodes = [NodeSpec(f"n{i}", rng.randrange(250, 600) * MB) for i in range(6)]
    first = plan(FP, nodes, N_CTX, SESSIONS)
    for _ in range(3):
        assert plan(FP, list(nodes), N_CTX, SESSIONS) == first


def _upper_bound(fp: Footprint, c: int) -> int:
    """Bytes any shard of c layers can need, wherever it sits (for the sufficiency check)."""
    big, kv = max(fp.layer_bytes), max(fp.kv_bytes_per_position)
    return (
        (c + 1) * (big + kv * N_CTX * SESSIONS) + fp.embed_bytes + fp.output_bytes + fp.norm_bytes
        + 512 * fp.n_embd * 4 * 16 + LLAMA_OVERHEAD + fp.n_vocab * 512 * 4
    )


def test_random_fleets():
    rng = random.Random(20240607)
    placed = refused = 0
    for _ in range(300):
        n_layer = rng.randrange(1, 30)
        fp = Footprint(
            n_layer=n_layer,
            layer_bytes=tuple(rng.randrange(1, 40) * MB for _ in range(n_layer)),
            embed_bytes=rng.randrange(1, 300) * MB,
            embed_row_bytes=rng.randrange(100, 5000),
            output_bytes=rng.choice([0, rng.randrange(1, 300) * MB]),
            norm_bytes=rng.randrange(0, 10000),
            kv_bytes_per_position=tuple(rng.choice([512, 1024, 4096]) for _ in range(n_layer)),
            n_vocab=rng.choice([32000, 151936, 262144]),
            n_embd=rng.choice([640, 2048, 4096]),
        )
        nodes = [NodeSpec(f"n{i}", rng.randrange(50, 1500) * MB) for i in range(rng.randrange(1, 9))]
        if rng.random() < 0.3:  # sometimes pin one node to a random range
            a = rng.randrange(n_layer)
            i = rng.randrange(len(nodes))
            nodes[i] = NodeSpec(nodes[i].node_id, nodes[i].memory, LayerRange(a, rng.randrange(a + 1, n_layer + 1)))
        try:
            p = plan(fp, nodes, N_CTX, SESSIONS)
        except PlacementError:
            refused += 1
            if all(n.pin is None for n in nodes):
                # Sufficient: if each node can hold cap_i layers anywhere and the caps add up, a plan exists.
                caps = [max([c for c in range(n_layer + 1) if _upper_bound(fp, c) <= n.memory], default=0)
                        for n in nodes]
                assert sum(caps) < n_layer, (fp, nodes)
            continue
        placed += 1
        check(fp, nodes, p)
        assert plan(fp, nodes, N_CTX, SESSIONS) == p
        for n in nodes:
            if n.pin is not None:
                assert Assignment(n.node_id, n.pin) in p.assignments
    assert placed > 100 and refused > 10  # the fleets exercise both outcomes


def test_footprint_of_default_model(model_path):
    model = read_gguf(model_path)
    fp = footprint(model)
    assert fp.n_layer == 18 and fp.n_embd == 640
    assert fp.n_vocab == 262144 and fp.output_bytes == 0
    weights = sum(fp.layer_bytes) + fp.embed_bytes + fp.output_bytes + fp.norm_bytes
    assert abs(weights - model.file_size) / model.file_size < 0.05
    # Gemma 3 270M: one KV head of 256 for keys and values, f16.
    assert fp.kv_bytes_per_position == (2 * (256 + 256),) * 18
    assert fp.embed_row_bytes * 262144 == fp.embed_bytes
    nodes = [NodeSpec(f"n{i}", 400 * MB) for i in (1, 2, 3)]
    check_real = plan(fp, nodes, 2048, 2)
    assert [a.node_id for a in check_real.route()] == ["n1", "n2", "n3"]


def test_footprint_of_tiny_llama(tiny_llama):
    fp = footprint(read_gguf(tiny_llama))
    assert fp.n_layer == 4 and fp.n_embd == 64
    assert fp.output_bytes == 300 * 64 * 4  # a separate output.weight, F32
    assert fp.kv_bytes_per_position == (2 * (16 * 2 + 16 * 2),) * 4  # head 64/4, two KV heads


def test_footprint_per_layer_kv_heads(tmp_path):
    """head_count_kv given per layer; key/value lengths default to n_embd / head_count."""
    kvs = {k: KV(k, None, v) for k, v in {
        "general.architecture": "llama", "llama.block_count": 3, "llama.embedding_length": 512,
        "llama.attention.head_count": 8, "llama.attention.head_count_kv": [8, 2, 0],
    }.items()}
    f32 = 0
    tensors = [TensorInfo("token_embd.weight", (512, 100), f32, 0, 512 * 100 * 4),
               TensorInfo("output_norm.weight", (512,), f32, 0, 2048)]
    tensors += [TensorInfo(f"blk.{i}.attn_q.weight", (512, 512), f32, 0, 512 * 512 * 4) for i in range(3)]
    fp = footprint(GGUFFile(tmp_path / "m.gguf", 3, kvs, tensors, 32, 0))
    assert fp.kv_bytes_per_position == (2 * 2 * 64 * 8, 2 * 2 * 64 * 2, 0)
    assert fp.layer_bytes == (512 * 512 * 4,) * 3 and fp.norm_bytes == 2048
    assert (fp.n_vocab, fp.embed_row_bytes) == (100, 2048)
    kvs["swarm.shard.layer_start"] = KV("swarm.shard.layer_start", None, 0)
    with pytest.raises(ModelFileError, match="is a shard"):
        footprint(GGUFFile(tmp_path / "s.gguf", 3, kvs, tensors, 32, 0))
