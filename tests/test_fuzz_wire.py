"""Fuzzing the wire (a short, seeded run; scripts/fuzz.py runs the same targets for longer).

Every gRPC handler of both services gets random messages and mutations of valid ones; the step stream gets
random bytes, lying lengths, unknown kinds and cut-short frames. Each must end in a reply or a clean status
(never INTERNAL or UNKNOWN, never a hang, never a dead process), and the coordinator must still answer.
"""

from __future__ import annotations

import time

import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fuzzing as fz

EXAMPLES = 30  # per method and kind; the long run (scripts/fuzz.py) tries thousands
FUZZ = settings(derandomize=True, deadline=30_000, max_examples=EXAMPLES, database=None,
                suppress_health_check=list(HealthCheck))
METHODS = fz.methods()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from fuzz_files import kv_material

    t = fz.Target(tmp_path_factory.mktemp("fuzz-wire"))
    t.kv = kv_material(t.swarm.tmp / "tiny.gguf")["full"]
    yield t
    t.close()


def _expect_clean(target, tally, what):
    assert target.alive(), f"the coordinator died on {what}:\n{target.log_tail()}"
    assert not tally.hangs, f"no answer within {target.hang_s} s: {tally.hangs}"
    assert not tally.bugs, f"not a clean status: {tally.bugs}\n{target.log_tail()}"
    assert target.answers(), f"the coordinator stopped answering after {what}"
    target.restore()


@pytest.mark.parametrize("service,method", METHODS, ids=[m.name for _, m in METHODS])
def test_handlers_take_random_messages(target, service, method):
    cls = fz.getattr_path(method.input_type)

    @FUZZ
    @given(st.lists(fz.message_strategy(cls, [target.address, target.step_address]), min_size=1, max_size=2))
    def run(requests):
        tally = fz.Tally()
        target.prepare(method.name)
        target.judge(tally, f"{method.name}({requests})", *target.call(service, method, requests))
        _expect_clean(target, tally, method.name)

    run()


@pytest.mark.parametrize("service,method", METHODS, ids=[m.name for _, m in METHODS])
def test_handlers_take_mutated_messages(target, service, method):
    cls = fz.getattr_path(method.input_type)
    seeds = [s.SerializeToString() for s in target.seeds(target.kv)[method.name]]

    @FUZZ
    @given(st.sampled_from(seeds), fz.mutations())
    def run(seed, ops):
        try:
            request = cls.FromString(fz.mutate(seed, ops))
        except DecodeError:
            assume(False)
        tally = fz.Tally()
        target.prepare(method.name)
        target.judge(tally, f"{method.name}({request})", *target.call(service, method, [request]))
        _expect_clean(target, tally, method.name)

    run()


def test_step_stream_takes_bad_frames(target):
    valid = fz.pb.ForwardRequest(session_id=fz.SESSION, n_positions=1, tokens=[1],
                                 layers=fz.pb.LayerSpan(start=0, end=fz.N_LAYER)).SerializeToString()
    streams = fz.step_streams(valid)

    @settings(FUZZ, max_examples=5 * EXAMPLES)
    @given(streams)
    def run(case):
        via, data = case
        tally = fz.Tally()
        target.judge_frames(tally, f"{via}: {data[:200]!r}", *target.send_raw(data, via))
        assert target.alive() and not tally.hangs and not tally.bugs, (tally.bugs, tally.hangs)
        assert target.step_answers(), "a valid step connection is no longer served"

    run()
    left = target.wait_connections_closed()
    assert not left, f"{left} step connections (and their threads) left open after their callers closed them"


def test_a_lying_frame_length_costs_no_memory_before_its_bytes_arrive(target):
    """A frame header claiming 64 MB, then silence: the node allocated the whole 64 MB at once, per connection
    (256 of them: 16 GB). Now what it holds grows with the bytes that actually came."""
    import psutil

    process = psutil.Process(target.pid)
    before = process.memory_info().rss
    conns = []
    try:
        for _ in range(8):
            c = target.connect()
            c.sendall(target.hello() + fz.struct.pack("<IB", fz.MAX_MESSAGE, 1) + b"\0" * 1000)
            conns.append(c)
        deadline = time.monotonic() + 1.0
        grown = 0
        while time.monotonic() < deadline:
            grown = max(grown, process.memory_info().rss - before)
            time.sleep(0.05)
    finally:
        for c in conns:
            c.close()
    assert grown < 128 << 20, f"8 connections that sent 1 KB each took {grown >> 20} MB"
    assert target.wait_connections_closed() == 0 and target.step_answers()
