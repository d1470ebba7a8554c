"""KV checkpoints as deltas: a full state, then only the cells that changed, put back together exactly.

Real llama.cpp and Gemma 3 270M's shards: a session grows past Gemma 3's 512-position sliding
window (its window cache drops old cells as new ones come), and the chain of deltas must join into
exactly the bytes llama.cpp exports at the end, and import into a fresh shard that then computes
exactly what the original does. Damaged or mismatched pieces are refused with KVStateError.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from swarm import kvstate
from swarm.engine import Shard, join_kv, kv_header
from swarm.engine.kvblob import _pack_kv, _parse_kv_blob
from swarm.errors import KVStateError
from swarm.layers import LayerRange
from swarm.slicing import slice_model

N_CTX = 1280
STEPS = [512, 512, 3, 1, 1, 200, 1, 1]  # prompt batches, then decode steps, past the window


@pytest.fixture(scope="module", params=[(0, 6), (6, 12), (12, 18)], ids=["first", "middle", "last"])
def shard_path(request, model_path):
    return slice_model(model_path, LayerRange(*request.param)).path


def _inputs(shard: Shard, rng, n: int):
    if shard.layers.start == 0:
        return [int(t) for t in rng.integers(10, 5000, n)]
    return rng.standard_normal((n, shard.n_embd)).astype(np.float32)


def _chain(shard: Shard, rng, session="s") -> tuple[list[bytes], int]:
    chain, base, pos = [], None, 0
    for n in STEPS:
        shard.forward(session, _inputs(shard, rng, n), pos)
        pos += n
        blob, positions, base = shard.checkpoint_kv(session, base)
        assert positions == pos == kv_header(blob)["n_past"]
        chain.append(blob)
    return chain, pos


def test_a_chain_of_deltas_joins_into_exactly_the_exported_state(shard_path):
    rng = np.random.default_rng(1)
    with Shard(shard_path, n_ctx=N_CTX, max_sessions=2) as shard:
        shard.open_session("other")
        shard.forward("other", _inputs(shard, rng, 40), 0)  # another session in the same context
        shard.open_session("s")
        chain, pos = _chain(shard, rng)
        heads = [kv_header(b) for b in chain]
        assert "base" not in heads[0] and all(h["base"] == p["n_past"] for h, p in zip(heads[1:], heads))
        assert len({h["lineage"] for h in heads}) == 1
        assert all(len(d) < len(chain[0]) / 50 for d, n in zip(chain[1:], STEPS[1:]) if n == 1)  # one new cell
        joined = join_kv(chain)
        assert _parse_kv_blob(joined)[1] == _parse_kv_blob(shard.export_kv("s"))[1]
        cells = kvstate.layout(_parse_kv_blob(joined)[1]).cells
        assert max(cells) == pos and min(c for c in cells if c) < pos  # the window cache did drop cells
        with Shard(shard_path, n_ctx=N_CTX, max_sessions=2) as fresh:
            fresh.import_kv("s", joined)
            x = _inputs(shard, rng, 1)
            assert np.array_equal(shard.forward("s", x, pos), fresh.forward("s", x, pos))


def test_a_rewind_or_an_import_starts_a_new_chain(shard_path):
    rng = np.random.default_rng(2)
    with Shard(shard_path, n_ctx=N_CTX) as shard:
        shard.open_session("s")
        shard.forward("s", _inputs(shard, rng, 30), 0)
        blob, _, base = shard.checkpoint_kv("s")
        shard.forward("s", _inputs(shard, rng, 1), 30)
        delta, _, base = shard.checkpoint_kv("s", base)
        assert kv_header(delta)["base"] == 30
        shard.rollback("s", 29)
        again, n, base = shard.checkpoint_kv("s", base)
        assert n == 29 and "base" not in kv_header(again)  # the cells changed: a full state
        shard.import_kv("s", blob)
        after, n, _ = shard.checkpoint_kv("s", base)
        assert n == 30 and "base" not in kv_header(after)


def test_damaged_or_mismatched_pieces_are_refused(shard_path):
    rng = np.random.default_rng(3)
    with Shard(shard_path, n_ctx=N_CTX, max_sessions=2) as shard:
        shard.open_session("s")
        chain, _ = _chain(shard, rng)
        with pytest.raises(KVStateError, match="join_kv first"):
            shard.import_kv("s", chain[-1])  # a delta alone is not a state
        with pytest.raises(KVStateError, match="must start with a full one"):
            join_kv(chain[1:])
        with pytest.raises(KVStateError, match="does not follow"):
            join_kv([chain[0], chain[2]])  # a link left out
        shard.open_session("t")
        other, _ = _chain(shard, np.random.default_rng(4), "t")
        with pytest.raises(KVStateError, match="does not follow"):
            join_kv([chain[0], other[1]])  # another chain
        damaged = bytearray(chain[3])
        damaged[-5] ^= 0xFF
        with pytest.raises(KVStateError, match="checksum"):
            join_kv(chain[:3] + [bytes(damaged)])
        # Checksummed but lying (a peer holding the key): a cell list naming a million cells, or one twice.
        head, payload = _parse_kv_blob(chain[3])
        head = {k: v for k, v in head.items() if k != "sha256"}
        (streams,) = struct.unpack_from("<I", payload)
        (runs,) = struct.unpack_from("<I", payload, 4)
        for lie in ((0, 1_000_000), (0, 2)):
            forged = bytearray(payload)
            struct.pack_into("<ii", forged, 8, *lie)  # the first stream's first run: (start, count)
            if lie[1] == 2:  # one run naming cell 0 twice: (0, 1) then (0, 1)
                forged = payload[:4] + struct.pack("<Iiiii", 2, 0, 1, 0, 1) + payload[8 + 8 * runs:]
            with pytest.raises(KVStateError, match="names more cells|twice|does not match"):
                join_kv(chain[:3] + [_pack_kv(head, bytes(forged))])
        assert streams == len(kvstate.layout(_parse_kv_blob(chain[0])[1]).cells)
        assert join_kv(chain)  # the good chain still joins


def test_parsing_refuses_what_llama_cpp_did_not_write(shard_path):
    rng = np.random.default_rng(5)
    with Shard(shard_path, n_ctx=N_CTX) as shard:
        shard.open_session("s")
        shard.forward("s", _inputs(shard, rng, 20), 0)
        payload = _parse_kv_blob(shard.export_kv("s"))[1]
    assert kvstate.layout(payload).cells[0] == 20
    for bad in (payload[:5], payload[:len(payload) // 2], payload[:8] + b"\xff\xff\xff\xff" + payload[12:],
                payload[:8] + b"\x00\x00\x00\x00"):
        with pytest.raises(KVStateError):
            kvstate.layout(bad)
    lay = kvstate.layout(payload)
    with pytest.raises(KVStateError):
        kvstate.apply(payload, [b"\x01\x00\x00\x00" + b"\x05\x00\x00\x00" + b"\x00" * 8])  # cut short
    with pytest.raises(KVStateError):
        kvstate.apply(payload, [b"\x00\x00\x00\x00" + payload[:8]])  # a delta without the base's streams
    assert kvstate.apply(payload, []) == payload
    assert kvstate.delta(payload, lay, kvstate.positions(payload, lay))  # nothing new: still a valid delta


def _held(blob: bytes) -> list[bytes]:
    """A state's cells (positions, K and V) per cache, whichever of the context's slots held them."""
    payload = _parse_kv_blob(blob)[1]
    lay = kvstate.layout(payload)
    out = []
    for streams in lay.caches:
        for st in streams:
            if st.cells:
                last = st.blocks[-1]
                held = np.frombuffer(payload, "<i4", 3 * st.cells, st.meta[0])[0::3]  # (position, 1, sequence)
                out.append(held.tobytes() + bytes(payload[st.meta[1]:last.at + last.rows * st.cells * last.width]))
    return out


def _run_to(shard: Shard, rng, n: int, session="s") -> None:
    """A session of n positions as the swarm runs one: prompt batches of 512, then one position a step."""
    pos = 0
    while pos < n:
        k = min(512, n - pos) if pos < 1024 else 1
        shard.forward(session, _inputs(shard, rng, k), pos)
        pos += k


@pytest.mark.parametrize("n", [300, 1229], ids=["inside-window", "past-window"])
def test_an_imported_state_computes_bit_for_bit_what_the_exporter_would(shard_path, n):
    """Past Gemma 3's 512-position window, llama.cpp exports only the window's cells and would import them
    into the first free cells; the shard puts each one back in the cell it had (placeholders for the cells
    the window left behind), so attention sums in the same order and the next steps match to the bit
    (on AVX2 CPUs they did not: max |diff| ~1e-4)."""
    rng = np.random.default_rng(6)
    with Shard(shard_path, n_ctx=N_CTX, max_sessions=2) as shard, \
            Shard(shard_path, n_ctx=N_CTX, max_sessions=2) as fresh:
        fresh.open_session("other")  # the session lands in another slot than on the exporter
        fresh.forward("other", _inputs(fresh, rng, 10), 0)
        shard.open_session("s")
        _run_to(shard, rng, n)
        blob = shard.export_kv("s")
        fresh.import_kv("s", blob)
        assert fresh.kv_span("s") == shard.kv_span("s") == (0, n)  # the window's old cells are kept, as there
        assert _held(fresh.export_kv("s")) == _held(blob)  # and exports them again as they came
        for pos in range(n, n + 4):
            x = _inputs(shard, rng, 1)
            assert np.array_equal(shard.forward("s", x, pos), fresh.forward("s", x, pos)), pos
        if n > 512:  # the window's cells before the import are placeholders: no rollback may expose them
            with pytest.raises(KVStateError, match="imported at"):
                fresh.rollback("s", n - 10)
        fresh.rollback("s", n + 1)
        fresh.rollback("s", 0)
        assert fresh.kv_span("s") == (0, 0)
