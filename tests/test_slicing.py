"""The slicer: exact metadata per architecture, deterministic content-named files, refusals."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from gguf.constants import GGUFValueType

from swarm import LayerRange, ShardRole
from swarm.chain import LocalChain
from swarm.errors import ShardRangeError, UnsupportedModelError
from swarm.gguf_file import read_gguf
from swarm.slicing import slice_model
from tiny_models import N_FF, N_LAYER, write_tiny_llama


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_gemma_shards_carry_their_slice_of_the_sliding_window_pattern(model_path, tmp_path):
    shard = slice_model(model_path, LayerRange(6, 12), tmp_path)
    meta = read_gguf(shard.path)
    assert shard.role == ShardRole.MIDDLE
    assert meta.get("gemma3.block_count") == 6
    # llama.cpp's default for Gemma 3: layer i is global when i % 6 == 5.
    assert meta.get("gemma3.attention.sliding_window_pattern") == [True] * 5 + [False]
    assert [t.name for t in meta.tensors if t.name.startswith("blk.")][0].startswith("blk.0.")
    assert max(int(t.name.split(".")[1]) for t in meta.tensors if t.name.startswith("blk.")) == 5
    first = read_gguf(slice_model(model_path, LayerRange(0, 4), tmp_path, lookahead=False).path)
    assert first.get("gemma3.attention.sliding_window_pattern") == [True] * 4
    last = read_gguf(slice_model(model_path, LayerRange(10, 18), tmp_path).path)
    assert last.get("gemma3.attention.sliding_window_pattern") == [True, False] + [True] * 5 + [False]


def test_first_shard_gets_a_lookahead_block_when_it_is_cheaper_than_logits(model_path, tmp_path):
    """Gemma: one block (~4 MB) is far less than 512 rows of 262k logits (537 MB)."""
    shard = slice_model(model_path, LayerRange(0, 5), tmp_path)
    meta = read_gguf(shard.path)
    assert shard.lookahead == 1 and meta.get("swarm.shard.lookahead") == 1
    assert meta.get("gemma3.block_count") == 6  # five layers plus layer 5 as the look-ahead
    assert meta.get("gemma3.attention.sliding_window_pattern") == [True] * 5 + [False]
    assert meta.get("swarm.shard.layer_end") == 5
    plain = slice_model(model_path, LayerRange(0, 5), tmp_path, lookahead=False)
    assert plain.lookahead == 0 and plain.shard_id != shard.shard_id
    assert read_gguf(plain.path).get("gemma3.block_count") == 5
    # Only first shards ever get one.
    assert slice_model(model_path, LayerRange(5, 10), tmp_path, lookahead=True).lookahead == 0


def test_middle_shard_drops_the_vocabulary(model_path, tmp_path):
    full = read_gguf(model_path)
    middle = read_gguf(slice_model(model_path, LayerRange(6, 12), tmp_path).path)
    assert middle.get("tokenizer.ggml.model") == "none"
    assert "tokenizer.ggml.tokens" not in middle.kvs
    assert middle.get("gemma3.vocab_size") == 1
    assert middle.tensor("token_embd.weight").shape == (640, 1)
    assert middle.path.stat().st_size < 30e6 < 200e6 < full.path.stat().st_size


def test_first_shard_keeps_vocab_and_last_keeps_head(model_path, tmp_path):
    first = read_gguf(slice_model(model_path, LayerRange(0, 6), tmp_path).path)
    last = read_gguf(slice_model(model_path, LayerRange(12, 18), tmp_path).path)
    for shard in (first, last):
        assert len(shard.get("tokenizer.ggml.tokens")) == 262144
        assert shard.tensor("token_embd.weight").shape == (640, 262144)


def test_same_input_same_bytes_and_content_name(model_path, tmp_path):
    a = slice_model(model_path, LayerRange(3, 9), tmp_path / "a")
    b = slice_model(model_path, LayerRange(3, 9), tmp_path / "b")
    assert a.path.name == b.path.name
    assert _sha(a.path) == _sha(b.path)
    stamp = a.path.stat().st_mtime_ns
    again = slice_model(model_path, LayerRange(3, 9), tmp_path / "a")
    assert again.path == a.path and again.path.stat().st_mtime_ns == stamp  # made once, reused
    other = slice_model(model_path, LayerRange(3, 10), tmp_path / "a")
    assert other.path.name != a.path.name and other.shard_id != a.shard_id


def test_the_whole_range_is_the_model_itself(model_path, tmp_path):
    whole = slice_model(model_path, LayerRange(0, 18), tmp_path)
    assert whole.path == model_path.resolve() and whole.role == ShardRole.WHOLE
    assert not list(tmp_path.iterdir())  # nothing copied


def test_range_outside_the_model_is_refused(model_path, tmp_path):
    with pytest.raises(ShardRangeError, match="outside the model, which has 18 layers"):
        slice_model(model_path, LayerRange(12, 19), tmp_path)
    with pytest.raises(ShardRangeError, match="empty"):
        LayerRange(5, 5)
    with pytest.raises(ShardRangeError, match="START:END"):
        LayerRange.parse("3-7")


def test_tiny_llama_per_layer_arrays_are_sliced(tiny_llama, tmp_path):
    shard = read_gguf(slice_model(tiny_llama, LayerRange(1, 3), tmp_path).path)
    assert shard.get("llama.block_count") == 2
    assert shard.get("llama.feed_forward_length") == [N_FF, N_FF]
    assert shard.get("swarm.shard.layer_start") == 1 and shard.get("swarm.shard.n_layer_total") == N_LAYER
    assert shard.tensor("output.weight") is None  # a middle shard computes no logits


@pytest.mark.parametrize("lookahead", [True, False], ids=["lookahead", "all-rows-out"])
@pytest.mark.parametrize("split", [[(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)], [(0, 1), (1, 2), (2, 3), (3, 4)]])
@pytest.mark.parametrize("arch", ["llama", "mistral3", "qwen2", "qwen3"])
def test_llama_family_chain_equals_unsplit(tmp_path_factory, split, lookahead, arch):
    """Random-weight models of each supported llama-family architecture: bit-equal logits and tokens."""
    root = tmp_path_factory.getbasetemp() / f"tiny-{arch}"
    root.mkdir(exist_ok=True)
    model = root / "model.gguf"
    if not model.exists():
        write_tiny_llama(model, arch=arch)
    tokens = [1, 5, 77, 200, 260, 299, 42, 7]
    with LocalChain(model, 1, shard_dir=root) as whole, LocalChain(
        model, [LayerRange(*r) for r in split], shard_dir=root, lookahead=lookahead
    ) as parts:
        assert parts.shards[0].info.lookahead == int(lookahead)
        a, b = whole.open_session(), parts.open_session()
        diff = np.abs(whole.prefill(a, tokens) - parts.prefill(b, tokens)).max()
        assert diff == 0.0, f"largest logit difference {diff}"
        whole.drop_session(a)
        parts.drop_session(b)
        expected = list(whole.generate(tokens, 24, stop_at_eog=False))
        assert len(expected) == 24
        assert list(parts.generate(tokens, 24, stop_at_eog=False)) == expected


def test_unknown_architecture_is_refused_by_name(tmp_path):
    path = write_tiny_llama(tmp_path / "odd.gguf", arch="gptj")
    with pytest.raises(UnsupportedModelError, match="'gptj'"):
        slice_model(path, LayerRange(0, 2), tmp_path)


def test_unknown_per_layer_array_is_refused(tmp_path):
    path = write_tiny_llama(
        tmp_path / "odd-array.gguf",
        extra_kv={"llama.mystery_per_layer": ([1, 2, 3, 4], GGUFValueType.ARRAY, GGUFValueType.UINT32)},
    )
    with pytest.raises(UnsupportedModelError, match="llama.mystery_per_layer"):
        slice_model(path, LayerRange(0, 2), tmp_path)


def test_a_shard_cannot_be_sliced_again(tiny_llama, tmp_path):
    shard = slice_model(tiny_llama, LayerRange(0, 2), tmp_path)
    with pytest.raises(UnsupportedModelError, match="already a shard"):
        slice_model(shard.path, LayerRange(0, 1), tmp_path)


def test_gemma3_27b_count_derived_attention_scale_is_refused(tmp_path):
    """llama.cpp treats a 62-block Gemma 3 as the 27B and scales attention differently: no shard may change that."""
    import gguf

    path = tmp_path / "gemma3-62.gguf"
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(62)
    w.add_embedding_length(5376)
    w.add_head_count(32)
    w.add_key_length(128)  # 5376 / 32 = 168 != 128: the 27B's scale differs from other sizes'
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="attention scale"):
        slice_model(path, LayerRange(0, 31), tmp_path)
