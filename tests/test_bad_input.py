"""Bad input raises a clear SwarmError before it reaches llama.cpp, and the shard keeps working."""

from __future__ import annotations


import numpy as np
import pytest

from swarm import LayerRange
from swarm.chain import LocalChain
from swarm.engine import Shard, Tokenizer
from swarm.errors import BadInputError, EngineError, ContextFullError, KVStateError, ModelFileError, ShardRangeError
from swarm.models import resolve_model
from swarm.slicing import slice_model

N_CTX = 256


@pytest.fixture(scope="module")
def shards(model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bad-input-shards")
    paths = [slice_model(model_path, LayerRange(a, b), out).path for a, b in [(0, 6), (6, 12), (12, 18)]]
    loaded = [Shard(p, n_ctx=N_CTX, max_sessions=2, n_batch=64) for p in paths]
    yield loaded
    for s in loaded:
        s.close()


@pytest.fixture
def first(shards):
    yield shards[0]
    for s in list(shards[0].sessions()):
        shards[0].drop_session(s)


@pytest.fixture
def middle(shards):
    yield shards[1]
    for s in list(shards[1].sessions()):
        shards[1].drop_session(s)


def _still_works(shard):
    """After a refusal the shard still computes correctly."""
    shard.open_session("probe")
    try:
        x = [2, 651, 6037] if shard.role.takes_tokens else np.zeros((3, shard.n_embd), np.float32)
        out = shard.forward("probe", x)
        assert np.isfinite(out).all()
    finally:
        shard.drop_session("probe")


# ------------------------------------------------------------------ files


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Shard(tmp_path / "nope.gguf")
    with pytest.raises(ModelFileError, match="does not exist"):
        resolve_model(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"this is a text file, not a model\n" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF model"):
        Shard(bad)
    with pytest.raises(ModelFileError, match="not a GGUF model"):
        Tokenizer(bad)


def test_corrupt_header(shards, tmp_path):
    bad = tmp_path / "corrupt.gguf"
    data = bytearray(shards[1].path.read_bytes()[:4096])
    data[8:24] = b"\xff" * 16  # tensor and metadata counts
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="corrupt"):
        Shard(bad)


def test_truncated_file(shards, tmp_path):
    src = shards[1].path
    bad = tmp_path / "truncated.gguf"
    with open(src, "rb") as f, open(bad, "wb") as g:
        g.write(f.read(src.stat().st_size // 2))
    with pytest.raises(ModelFileError, match="truncated"):
        Shard(bad)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.gguf"
    bad.write_bytes(b"")
    with pytest.raises(ModelFileError, match="only 0 bytes"):
        Shard(bad)


def test_middle_shard_has_no_tokenizer(shards):
    with pytest.raises(ModelFileError, match="no vocabulary"):
        Tokenizer(shards[1].path)


def test_ranges_that_do_not_tile_the_model(model_path):
    with pytest.raises(BadInputError, match="without gaps"):
        LocalChain(model_path, [LayerRange(0, 6), LayerRange(7, 18)])
    with pytest.raises(ShardRangeError, match="cannot cut 18 layers into 19"):
        LocalChain(model_path, 19)


# ------------------------------------------------------------------ inputs


def test_hidden_states_of_wrong_width(middle):
    middle.open_session("a")
    with pytest.raises(BadInputError, match=r"shape \(n, 640\)"):
        middle.forward("a", np.zeros((2, 512), np.float32))
    with pytest.raises(BadInputError, match=r"shape \(n, 640\)"):
        middle.forward("a", np.zeros(640, np.float32))
    assert middle.session_length("a") == 0
    _still_works(middle)


def test_hidden_states_of_wrong_dtype(middle):
    middle.open_session("a")
    with pytest.raises(BadInputError, match="float32"):
        middle.forward("a", np.zeros((2, 640), np.float64))
    with pytest.raises(BadInputError, match="float32 numpy array"):
        middle.forward("a", [[0.0] * 640])
    poisoned = np.zeros((2, 640), np.float32)
    poisoned[1, 7] = np.nan
    with pytest.raises(BadInputError, match="NaN or infinity"):
        middle.forward("a", poisoned)
    _still_works(middle)


def test_token_ids_out_of_range_or_not_ints(first):
    first.open_session("a")
    with pytest.raises(BadInputError, match="token id 262144 is outside the vocabulary"):
        first.forward("a", [2, 262144])
    with pytest.raises(BadInputError, match="token id -1"):
        first.forward("a", [-1])
    with pytest.raises(BadInputError, match="1-D list of token ids"):
        first.forward("a", np.zeros((1, 640), np.float32))
    _still_works(first)


def test_positions_that_skip_or_go_back(first):
    first.open_session("a")
    first.forward("a", [2, 651, 6037])
    with pytest.raises(BadInputError, match="holds 3 positions, so the next batch starts at 3, not 5"):
        first.forward("a", [10], start=5)
    with pytest.raises(BadInputError, match="not 1"):
        first.forward("a", [10], start=1)
    assert first.session_length("a") == 3
    first.forward("a", [10], start=3)
    assert first.session_length("a") == 4


def test_empty_and_oversized_batches(first):
    first.open_session("a")
    with pytest.raises(BadInputError, match="at least one position"):
        first.forward("a", [])
    with pytest.raises(BadInputError, match="larger than this shard's n_batch"):
        first.forward("a", [5] * 65)
    _still_works(first)


def test_more_tokens_than_the_context_holds(first):
    first.open_session("a")
    for _ in range(N_CTX // 64):
        first.forward("a", [5] * 64)
    with pytest.raises(ContextFullError, match="context holds 256"):
        first.forward("a", [5])
    assert first.session_length("a") == N_CTX


def test_more_sessions_than_the_shard_holds(first):
    first.open_session("a")
    first.open_session("b")
    with pytest.raises(ContextFullError, match="already holds 2 sessions"):
        first.open_session("c")
    with pytest.raises(BadInputError, match="already open"):
        first.open_session("a")
    first.drop_session("b")
    first.open_session("c")


def test_unknown_session(first):
    with pytest.raises(BadInputError, match="unknown session 'ghost'"):
        first.forward("ghost", [2])
    with pytest.raises(BadInputError, match="unknown session"):
        first.export_kv("ghost")


# ------------------------------------------------------------------ KV blobs


def test_kv_blob_from_a_different_shard(shards):
    first, middle = shards[0], shards[1]
    first.open_session("a")
    first.forward("a", [2, 651])
    blob = first.export_kv("a")
    with pytest.raises(KVStateError, match="belongs to another shard .layers 0:6.* this shard holds layers 6:12"):
        middle.import_kv("a", blob)
    assert "a" not in middle.sessions()
    first.drop_session("a")
    _still_works(middle)


def test_damaged_or_foreign_kv_blob(first):
    first.open_session("a")
    first.forward("a", [2, 651])
    blob = first.export_kv("a")
    first.drop_session("a")
    damaged = bytearray(blob)
    damaged[len(blob) // 2] ^= 0xFF  # one flipped byte inside the payload
    damaged = bytes(damaged)
    with pytest.raises(KVStateError, match="checksum"):
        first.import_kv("b", damaged)
    with pytest.raises(KVStateError, match="checksum"):
        first.import_kv("b", blob[: len(blob) // 2])
    with pytest.raises(KVStateError, match="bad magic"):
        first.import_kv("b", b"GGUF" + bytes(100))
    with pytest.raises(KVStateError, match="must be bytes"):
        first.import_kv("b", "text")
    first.import_kv("b", blob)  # the good blob still loads
    assert first.session_length("b") == 2


def test_truncated_inside_the_vocabulary(shards, tmp_path):
    bad = tmp_path / "cut-in-vocab.gguf"
    with open(shards[0].path, "rb") as f:
        bad.write_bytes(f.read(1 << 20))  # the header's token list alone is several MB
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        Shard(bad)
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        Tokenizer(bad)


def test_closed_shard_refuses_work(shards):
    shard = Shard(shards[1].path, n_ctx=N_CTX)
    shard.open_session("a")
    shard.close()
    with pytest.raises(EngineError, match="closed"):
        shard.forward("a", np.zeros((1, 640), np.float32))
    with pytest.raises(EngineError, match="closed"):
        shard.open_session("b")
    shard.drop_session("a")  # harmless


@pytest.mark.parametrize("option", [{"n_ctx": 0}, {"max_sessions": -1}, {"n_threads": 0}, {"n_batch": 1.5}])
def test_impossible_shard_options(shards, option):
    with pytest.raises(BadInputError, match="positive whole number"):
        Shard(shards[1].path, **option)


@pytest.mark.parametrize("settings", [{"max_sessions": 1}, {"flash_attn": True}, {"n_ctx": 32}])
def test_kv_blob_into_a_shard_loaded_with_other_settings(shards, settings):
    """Same shard file, incompatible KV layout: refused with the setting named, never loaded wrong."""
    middle = shards[1]
    middle.open_session("a")
    try:
        middle.forward("a", np.zeros((60, 640), np.float32))
        blob = middle.export_kv("a")
    finally:
        middle.drop_session("a")
    kwargs = {"n_ctx": N_CTX, "max_sessions": 2, **settings}
    with Shard(middle.path, **kwargs) as other:
        name = next(iter(settings))
        with pytest.raises(KVStateError, match=name if name != "n_ctx" else "holds 60 positions but this shard's context holds 32"):
            other.import_kv("a", blob)
        assert "a" not in other.sessions() or other.session_length("a") == 0
        _still_works(other)


def test_model_whose_tensors_do_not_match_its_architecture(tmp_path):
    """Valid GGUF, wrong contents (llama tensors labelled gemma3): llama.cpp's refusal becomes a clear error."""
    from tiny_models import write_tiny_llama

    path = write_tiny_llama(tmp_path / "mislabelled.gguf", arch="gemma3")
    with pytest.raises(ModelFileError, match="llama.cpp could not load"):
        Shard(path)


def test_kv_header_tampering_is_detected(first):
    """Editing the header (say, the position count) breaks the checksum: never a confused cache."""
    import json
    import struct

    first.open_session("a")
    first.forward("a", [2, 651, 6037])
    blob = first.export_kv("a")
    first.drop_session("a")
    magic, (hlen,) = blob[:8], struct.unpack_from("<I", blob, 8)
    head = json.loads(blob[12:12 + hlen])
    head["n_past"] = 2
    forged = json.dumps(head, sort_keys=True).encode()
    tampered = magic + struct.pack("<I", len(forged)) + forged + blob[12 + hlen:]
    with pytest.raises(KVStateError, match="checksum"):
        first.import_kv("b", tampered)
    assert "b" not in first.sessions()


def test_kv_imports_into_a_larger_context(shards):
    middle = shards[1]
    middle.open_session("a")
    try:
        middle.forward("a", np.ones((20, 640), np.float32))
        blob = middle.export_kv("a")
        expected = middle.forward("a", np.ones((1, 640), np.float32))
    finally:
        middle.drop_session("a")
    with Shard(middle.path, n_ctx=2 * N_CTX, max_sessions=2) as bigger:
        bigger.import_kv("a", blob)
        assert bigger.session_length("a") == 20
        assert np.array_equal(bigger.forward("a", np.ones((1, 640), np.float32)), expected)


def test_sizes_beyond_llama_cpp_fields_are_refused(shards):
    with pytest.raises(BadInputError, match="at most"):
        Shard(shards[1].path, n_ctx=2**32 + 64, n_batch=2**32 + 64)
    with pytest.raises(BadInputError, match="at most"):
        Shard(shards[1].path, n_ctx=1 << 20, max_sessions=64)


def test_chain_stays_in_step_when_a_later_shard_refuses(model_path):
    """A failure in shard k rolls back the shards before it, so the session can go on."""
    with LocalChain(model_path, 3, n_ctx=64, n_batch=64) as chain:
        sid = chain.open_session()
        chain.step(sid, [2, 651, 6037])
        last = chain.shards[-1]
        last.rollback(sid, 2)  # make the last shard refuse the next step (positions no longer line up)
        with pytest.raises(BadInputError, match="positions must continue"):
            chain.step(sid, [10])
        assert [s.session_length(sid) for s in chain.shards] == [3, 3, 2]
        last.rollback(sid, 2)
        for s in chain.shards[:-1]:
            s.rollback(sid, 2)
        assert np.isfinite(chain.step(sid, [6037])).all()
        assert {s.session_length(sid) for s in chain.shards} == {3}


def _gguf_with(tmp_path, name, kvs):
    import gguf

    path = tmp_path / name
    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, vtype, sub) in kvs.items():
        w.add_key_value(key, value, vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_mistyped_or_nested_metadata(tmp_path):
    from gguf.constants import GGUFValueType as T

    from swarm.gguf_file import read_gguf

    bad_align = _gguf_with(tmp_path, "align.gguf", {"general.alignment": ("32", T.STRING, None)})
    with pytest.raises(ModelFileError, match="alignment"):
        read_gguf(bad_align)
    bad_count = _gguf_with(tmp_path, "count.gguf", {"llama.block_count": ("four", T.STRING, None)})
    with pytest.raises(ModelFileError, match="should be a whole number"):
        Shard(bad_count)
    # A nested array: write one by hand (gguf-py will not), an array whose items are arrays.
    nested = tmp_path / "nested.gguf"
    key = b"llama.nested"
    body = struct_pack_kv(key)
    nested.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little") + body)
    with pytest.raises(ModelFileError, match="nests arrays"):
        read_gguf(nested)


def struct_pack_kv(key: bytes) -> bytes:
    import struct

    return struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 1) + struct.pack("<I", 7)


def test_a_ping_reply_is_bounded():
    from swarm.node.service import MAX_PING, Node

    assert Node.ping(16) == bytes(16) and len(Node.ping(MAX_PING)) == MAX_PING
    for bad in (MAX_PING + 1, -1, 1 << 40):
        with pytest.raises(BadInputError, match="a ping reply is 0 to"):
            Node.ping(bad)
