"""Fuzzing the byte formats (a short, seeded run; scripts/fuzz.py runs the same targets for longer).

KV blobs and deltas, damaged or forged with a correct checksum (what a keyed peer can send), must raise
KVStateError before llama.cpp sees anything it cannot read; the ones that pass are imported in a child
process, whose death would be a crash. GGUF headers with flipped bytes, huge counts and lengths, or cut
short must raise ModelFileError, fast, without an allocation sized by a false length.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_files as ff
import fuzzing as fz
from swarm.engine.kvblob import _parse_kv_blob
from swarm.errors import KVStateError, ModelFileError

FUZZ = settings(derandomize=True, deadline=10_000, max_examples=250, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from tiny_models import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("fuzz-files") / "tiny.gguf")


@pytest.fixture(scope="module")
def kv(model):
    return ff.kv_material(model)


@pytest.fixture(scope="module")
def worker(model):
    w = ff.ImportWorker(model)
    yield w
    w.close()


def _imported(worker, blob):
    answer = worker.load(blob)
    assert not answer.startswith("crash") and "BUG" not in answer, answer
    assert answer == "ok" or answer.startswith(("KVStateError", "BadInputError")), answer


def test_damaged_kv_blobs(kv):
    @FUZZ
    @given(st.sampled_from(["full", "delta"]), fz.mutations(hot=list(range(0, 16)) + [20, 40, 60]))
    def run(which, ops):
        assert ff.kv_checks(kv, fz.mutate(kv[which], ops), "blob") == []

    run()


def test_forged_kv_states(kv, worker):
    head = _parse_kv_blob(kv["full"])[0]
    hot = ff.kv_fields(kv["full_payload"])

    @FUZZ
    @given(fz.mutations(hot=hot), st.one_of(st.just(0), st.integers(-(1 << 31), 1 << 31)), st.integers(0, 3))
    def run(ops, shift, stream):
        payload = ff.shift_positions(fz.mutate(kv["full_payload"], ops), stream, shift)
        assert ff.kv_checks(kv, payload, "full") == []
        _imported(worker, ff.forge(head, payload))

    run()


def test_forged_kv_deltas(kv, worker):
    dhead = _parse_kv_blob(kv["delta"])[0]

    @FUZZ
    @given(fz.mutations(hot=list(range(0, 48, 4))))
    def run(ops):
        payload = fz.mutate(kv["delta_payload"], ops)
        assert ff.kv_checks(kv, payload, "delta") == []

    run()


def test_forged_kv_headers(kv, worker):
    head = _parse_kv_blob(kv["full"])[0]
    edits = st.fixed_dictionaries({}, optional={k: st.sampled_from(v) for k, v in ff.HEAD_EDITS.items()})

    @FUZZ
    @given(edits)
    def run(edit):
        _imported(worker, ff.forge(head, kv["full_payload"], edit))

    run()


def test_gguf_headers(model):
    data, data_start = ff.gguf_material(model)
    hot = ff.gguf_fields(data)

    @settings(FUZZ, max_examples=600)
    @given(fz.mutations(hot=hot), st.booleans())
    def run(ops, header_only):
        assert ff.gguf_check(fz.mutate(data[:data_start] if header_only else data, ops)) is None

    run()


# ---------------------------------------------------------------- what the fuzzing found, pinned


def test_cells_beyond_a_states_length_are_refused_before_placeholders_are_made(kv, worker):
    """A forged state whose cells sit at positions 1e8.. (consecutive, so past single-edit checks) made
    fill_window allocate 1e8 placeholder cells: MemoryError, or a node killed for memory."""
    head = _parse_kv_blob(kv["full"])[0]
    payload = ff.shift_positions(kv["full_payload"], 0, 100_000_000)
    out, _, peak = ff.bounded(ff._fill, payload, head["n_past"])
    assert isinstance(out, KVStateError) and "position 100000005" in str(out) and peak < 1 << 20
    assert worker.load(ff.forge(head, payload)).startswith("KVStateError: KV state holds a cell at position")
    assert worker.load(kv["full"]) == "ok"


def test_a_lying_array_count_is_refused_before_its_index_is_made(model):
    """The vocabulary's count set to the file's size: an 8-byte index per claimed string was allocated first."""
    data, _ = ff.gguf_material(model)
    at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 8
    forged = data[:at] + struct.pack("<Q", len(data)) + data[at + 8:]
    out, _, peak = ff.bounded(lambda: ff._parse(ff._Cursor(forged, model), model, len(forged)))
    assert isinstance(out, ModelFileError) and f"claims {len(data)} items" in str(out), out
    assert peak < 256 << 10


def test_a_state_llama_cpp_half_reads_is_refused_before_it_can_spoil_the_cache(kv, worker):
    """A forged state with a cell at position -1 and a layout cut short was passed to llama.cpp as "not
    understood"; llama.cpp refused it, but its bookkeeping kept a position of 2^31 in the sequence, and every
    later import into that session slot failed ("says 6 positions but holds 2147483648") until a restart."""
    head = _parse_kv_blob(kv["full"])[0]
    ops = [("len", 298, 211), ("u32", 28, 111), ("u32", 3264, 255), ("varint", 2872, 235)]
    payload = ff.shift_positions(fz.mutate(kv["full_payload"], ops), 2, -779)
    answer = worker.load(ff.forge(head, payload))
    assert answer.startswith("KVStateError: KV state header is damaged") and "BUG" not in answer, answer
    assert worker.load(kv["full"]) == "ok"
