"""The wire protocol: generated code is current, conversions are faithful, bad values are refused."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from swarm import wire
from swarm._proto import swarm_pb2 as pb
from swarm.errors import BadInputError
from swarm.layers import LayerRange
from swarm.sampling import SamplingParams
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
        back = wire.sampling_from_pb(wire.sampling_to_pb(p))
        assert back.seed == p.seed and back.top_k == p.top_k and back.repeat_last_n == p.repeat_last_n
        assert back.temperature == pytest.approx(p.temperature) and back.top_p == pytest.approx(p.top_p)


def test_bad_sampling_from_the_wire_is_refused_and_unset_fields_mean_off():
    with pytest.raises(BadInputError, match="top_p"):
        wire.sampling_from_pb(pb.Sampling(temperature=0.5, top_p=1.5))
    with pytest.raises(BadInputError, match="temperature"):
        wire.sampling_from_pb(pb.Sampling(temperature=float("nan")))
    p = wire.sampling_from_pb(pb.Sampling(temperature=0.5))  # a client that sets only the temperature
    assert p.top_p == 1.0 and p.repeat_penalty == 1.0 and p.top_k == 0 and p.seed is None


def test_hidden_state_round_trip_and_size_check():
    x = np.random.default_rng(0).standard_normal((3, 640)).astype(np.float32)
    data = wire.encode_hidden(x)
    assert np.array_equal(wire.decode_hidden(data, 3, 640), x)
    with pytest.raises(BadInputError, match="wrong hidden-state size"):
        wire.decode_hidden(data, 2, 640)
    with pytest.raises(BadInputError, match="wrong hidden-state size"):
        wire.decode_hidden(data[:-1], 3, 640)


def test_spans_and_addresses():
    assert wire.layer_range(wire.span(LayerRange(6, 12))) == LayerRange(6, 12)
    assert wire.check_address("10.0.0.5:7700") == "10.0.0.5:7700"
    for bad in ("10.0.0.5", "host:0", "host:70000", "a b:1", ""):
        with pytest.raises(BadInputError, match="HOST:PORT"):
            wire.check_address(bad)


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
