"""The wire protocol: generated code is current, conversions are faithful, bad values are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from swarm import messages as m
from swarm import wire
from swarm._proto import swarm_pb2 as pb
from swarm.errors import BadInputError, ShardRangeError
from swarm.layers import LayerRange
from swarm.node.stepping import decode_hidden, encode_hidden
from swarm.sampling import SamplingParams
from swarm.wire import convert as cv
from swarm.wire import convert_client as cc
from swarm.textstream import TextStream, check_stops

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_not_stale(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for name in ("swarm_pb2.py", "swarm_pb2_grpc.py"):
        fresh = (tmp_path / "swarm" / "_proto" / name).read_text()
        committed = (ROOT / "swarm" / "_proto" / name).read_text()
        assert fresh == committed, f"swarm/_proto/{name} is stale: run python scripts/gen_proto.py and commit"


def test_sampling_round_trip():
    for p in (SamplingParams(), SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, repeat_penalty=1.3,
                                                repeat_last_n=32, seed=7)):
        back = cv.sampling_of(cv.sampling_pb(p))
        assert back.seed == p.seed and back.top_k == p.top_k and back.repeat_last_n == p.repeat_last_n
        assert back.temperature == pytest.approx(p.temperature) and back.top_p == pytest.approx(p.top_p)


def test_bad_sampling_from_the_wire_is_refused_and_unset_fields_mean_off():
    with pytest.raises(BadInputError, match="top_p"):
        cv.sampling_of(pb.Sampling(temperature=0.5, top_p=1.5))
    with pytest.raises(BadInputError, match="temperature"):
        cv.sampling_of(pb.Sampling(temperature=float("nan")))
    p = cv.sampling_of(pb.Sampling(temperature=0.5))  # a client that sets only the temperature
    assert p.top_p == 1.0 and p.repeat_penalty == 1.0 and p.top_k == 0 and p.seed is None


def test_hidden_state_round_trip_and_size_check():
    x = np.random.default_rng(0).standard_normal((3, 640)).astype(np.float32)
    data = encode_hidden(x)
    assert np.array_equal(decode_hidden(data, 3, 640), x)
    with pytest.raises(BadInputError, match="wrong hidden-state size"):
        decode_hidden(data, 2, 640)
    with pytest.raises(BadInputError, match="wrong hidden-state size"):
        decode_hidden(data[:-1], 3, 640)


def test_spans_and_addresses():
    assert cv.layers_of(cv.span(LayerRange(6, 12))) == LayerRange(6, 12)
    with pytest.raises(ShardRangeError):
        cv.layers_of(pb.LayerSpan(start=6, end=6))
    assert wire.check_address("10.0.0.5:7700") == "10.0.0.5:7700"
    for bad in ("10.0.0.5", "host:0", "host:70000", "a b:1", ""):
        with pytest.raises(BadInputError, match="HOST:PORT"):
            wire.check_address(bad)


def test_steps_and_their_results_cross_the_wire_unchanged():
    step = m.Step("s", 7, (3, 4), LayerRange(6, 12), b"\x01" * 8, (
        m.Hop("10.0.0.2:7700", LayerRange(12, 18), "10.0.0.2:7701", checkpoint=True, keep_from=5),), sample=True,
        replay=False, checkpoint=True, keep_from=2, epoch=3)
    assert cv.step_of(pb.ForwardRequest.FromString(cv.step_pb(step).SerializeToString())) == step
    result = m.StepResult(42, (m.HopTiming(LayerRange(0, 6), 1.5, 0.25, 0.0, 3.0, 4.5),))
    assert cv.step_result_of(cv.step_result_pb(result)) == result
    assert cv.step_result_of(cv.step_result_pb(m.StepResult())).token is None
    with pytest.raises(BadInputError, match="2 token ids for 3 positions"):
        cv.step_of(pb.ForwardRequest(session_id="s", n_positions=3, tokens=[1, 2], layers=cv.span(LayerRange(0, 6))))


def test_what_nodes_and_clients_send_crosses_the_wire_unchanged():
    res = m.Resources(8 << 30, 4 << 30, 2 << 30, 2, 2, (m.Device("CPU", "cpu", 1, 2),))
    join = m.JoinRequest("n", 7702, 7703, res, "10.0.0.3", LayerRange(0, 6), "0.1.0")
    assert cv.join_of(cv.join_pb(join)) == join
    assert cv.join_of(cv.join_pb(m.JoinRequest("n", 1, 2, res))).pin is None
    spec = m.ShardSpec("id", "f.gguf", 10, "0" * 64, LayerRange(6, 12), 18)
    load = m.Load(spec, m.ContextSettings(512, 2, 256), extra=True)
    assert cv.load_of(cv.load_pb(load)) == load and cv.load_of(cv.load_pb(m.Load(None))) == m.Load(None)
    state = m.ImportState("s", LayerRange(6, 12), 4, 2, (m.KeptStep(4, (9,), b"\x00" * 8),))
    assert cv.import_of(cv.import_pieces(state, b"kv")) == (state, b"kv")
    for message, to_pb, of in ((m.Rewind("s", LayerRange(0, 6), 5, 1), cv.rewind_pb, cv.rewind_of),
                               (m.Resend("s", LayerRange(0, 6), 2, 5, m.Hop("a:1", LayerRange(6, 12)), 1),
                                cv.resend_pb, cv.resend_of),
                               (m.Handoff("s", LayerRange(0, 6), m.Hop("a:1", LayerRange(0, 6)), 1),
                                cv.handoff_pb, cv.handoff_of),
                               (m.OpenSession("s", LayerRange(0, 6), SamplingParams(top_p=0.5, min_p=0.25, seed=3), (1, 2), 4),
                                cv.open_pb, cv.open_of)):
        assert of(to_pb(message)) == message
    ask = m.GenerateRequest(messages=(("user", "hi"),), max_tokens=5, sampling=SamplingParams(top_p=0.5, min_p=0.25),
                            stop=("\n",), timings=True)
    assert cc.generate_of(cc.generate_pb(ask)) == ask
    assert cc.generate_of(cc.generate_pb(m.GenerateRequest(prompt="x"))).prompt == "x"
    with pytest.raises(BadInputError, match="prompt or chat"):
        cc.generate_of(pb.GenerateRequest())
    for event in (m.Started("s", 3), m.Piece("a", (1,)), m.Done("stop", 3, 1, 2.0, 3.0, m.StepTimings(1, 1.0))):
        assert cc.event_of(cc.event_pb(event)) == event


def test_text_stream_holds_back_stop_string_prefixes():
    s = TextStream(["\n\n", "END"])
    out = [s.feed(b"Hello"), s.feed(b" E"), s.feed(b"N"), s.feed(b"D of story")]
    assert "".join(out) == "Hello " and s.stopped
    s = TextStream(["END"])
    assert s.feed(b"EN") == "" and s.feed(b"tropy") == "ENtropy" and not s.stopped
    # A UTF-8 character split across tokens is never cut.
    s = TextStream()
    snow = "\u2603".encode()
    assert s.feed(snow[:2]) == "" and s.feed(snow[2:]) == "\u2603"
    assert s.flush() == ""


def test_stop_strings_are_bounded():
    with pytest.raises(BadInputError):
        check_stops([""])
    with pytest.raises(BadInputError):
        check_stops(["x" * 300])
    with pytest.raises(BadInputError):
        check_stops(["a"] * 20)
    assert check_stops(["a", "b"]) == ["a", "b"]


def test_sizes():
    from swarm.join import parse_size

    assert parse_size("4GB") == 4 << 30
    assert parse_size("512M") == 512 << 20
    assert parse_size("1.5GiB") == int(1.5 * (1 << 30))
    assert parse_size("1000") == 1000
    with pytest.raises(BadInputError, match="4GB"):
        parse_size("lots")
