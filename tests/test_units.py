"""Pure logic: layer ranges, even splits, sampling, the interactive chat's conversation."""

from __future__ import annotations

import io
import sys
import types

import numpy as np
import pytest

from swarm import LayerRange, ShardRole
from swarm.errors import BadInputError, ShardRangeError
from swarm.layers import split_evenly
from swarm.sampling import Sampler, SamplingParams


def test_roles():
    assert LayerRange(0, 18).role(18) == ShardRole.WHOLE
    assert LayerRange(0, 6).role(18) == ShardRole.FIRST
    assert LayerRange(6, 12).role(18) == ShardRole.MIDDLE
    assert LayerRange(12, 18).role(18) == ShardRole.LAST
    assert ShardRole.FIRST.takes_tokens and not ShardRole.FIRST.gives_logits
    assert ShardRole.LAST.gives_logits and not ShardRole.LAST.takes_tokens


def test_parse_and_print():
    assert LayerRange.parse(" 3 : 9 ") == LayerRange(3, 9)
    assert str(LayerRange(3, 9)) == "3:9"
    for bad in ["3", "a:b", "9:3", "-1:4", "4:4"]:
        with pytest.raises(ShardRangeError):
            LayerRange.parse(bad)


@pytest.mark.parametrize("n,parts", [(18, 1), (18, 3), (18, 4), (18, 18), (7, 3), (80, 6)])
def test_split_evenly_tiles_the_model(n, parts):
    ranges = split_evenly(n, parts)
    assert len(ranges) == parts and ranges[0].start == 0 and ranges[-1].end == n
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    sizes = [r.count for r in ranges]
    assert max(sizes) - min(sizes) <= 1


def test_split_evenly_refuses_impossible_counts():
    with pytest.raises(ShardRangeError):
        split_evenly(18, 0)
    with pytest.raises(ShardRangeError):
        split_evenly(18, 19)


def test_greedy_is_argmax_first_maximum():
    logits = np.array([0.1, 3.0, 3.0, -1.0], np.float32)
    assert Sampler(SamplingParams()).sample(logits) == 1


def test_repeat_penalty_follows_llama_cpp_rule():
    logits = np.array([2.0, 1.9, -1.0, -1.1], np.float32)
    s = Sampler(SamplingParams(repeat_penalty=2.0), history=[0, 2])
    # 2.0 -> 1.0 (divided), -1.0 -> -2.0 (multiplied): token 1 now wins.
    assert s.sample(logits) == 1


def test_seeded_sampling_is_reproducible_and_respects_top_k():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal(1000).astype(np.float32)
    params = SamplingParams(temperature=1.5, top_k=5, top_p=1.0, min_p=0.0, seed=7)
    a, b = Sampler(params), Sampler(params)
    assert [a.sample(logits) for _ in range(50)] == [b.sample(logits) for _ in range(50)]
    top5 = set(np.argsort(-logits)[:5].tolist())
    s = Sampler(params)
    draws = {s.sample(logits) for _ in range(200)}
    assert draws <= top5 and len(draws) > 1


def test_min_p_and_top_p_cut_the_tail():
    logits = np.log(np.array([0.6, 0.3, 0.05, 0.05], np.float32))
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.85, min_p=0.0, seed=0))
    assert {s.sample(logits) for _ in range(300)} == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.4, seed=0))
    assert {s.sample(logits) for _ in range(300)} == {0, 1}


@pytest.mark.parametrize(
    "kwargs", [{"top_p": 0.0}, {"top_k": -1}, {"min_p": 1.0}, {"repeat_penalty": 0.0}, {"temperature": float("nan")}]
)
def test_impossible_sampling_options_are_refused(kwargs):
    with pytest.raises(BadInputError):
        SamplingParams(**kwargs)


def test_new_keys_can_be_typed_after_key_and_the_printed_form_parses():
    """A key that starts with "-" is taken for an option (`--key -x`: "expected one argument"); one in 64
    random keys did, and so did the `swarm join` command the coordinator printed for it."""
    from swarm import wire
    from swarm.cli import build_parser

    keys = [wire.new_key() for _ in range(3000)]
    assert not [k for k in keys if k.startswith("-")]
    assert len(set(keys)) == len(keys) and min(map(len, keys)) >= 24
    args = build_parser().parse_args(["join", "--coordinator", "10.0.0.2:7700", "--key=-5hX_a"])
    assert args.key == "-5hX_a"


class _RecordingClient:
    """Stands in for SwarmClient in `swarm chat`'s loop: keeps a copy of every conversation it is sent and
    answers the n-th with "answer n" (only the loop's own bookkeeping is under test here; the real-process
    test in test_swarm.py checks the same turns against a swarm)."""

    def __init__(self):
        self.sent: list[list[tuple[str, str]]] = []

    def chat(self, messages, **options):
        self.sent.append([(m["role"], m["content"]) for m in messages])  # a copy: the loop keeps appending
        text = f"answer {len(self.sent)}"

        class Reply:
            result = types.SimpleNamespace(text=text)

            def __iter__(self):
                yield text

        return Reply()


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_chat_sends_the_conversation_so_far_and_reset_forgets_it(monkeypatch, capsys, system):
    from swarm.cli import build_parser
    from swarm.cli import chat_session as _chat

    args = build_parser().parse_args(["chat"] + (["--system", system] if system else []))
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi!\nSay it again.\n/reset\nAnd now?\n/quit\n"))
    client = _RecordingClient()
    assert _chat(client, args) == 0
    start = [("system", system)] if system else []
    assert client.sent == [
        start + [("user", "Hi!")],
        start + [("user", "Hi!"), ("assistant", "answer 1"), ("user", "Say it again.")],
        start + [("user", "And now?")],  # the system message outlives /reset, the exchanges do not
    ]
    out = capsys.readouterr()
    assert out.out == "> answer 1\n> answer 2\n> > answer 3\n> "
    assert "(conversation forgotten)" in out.err


def test_a_restarted_coordinator_never_hands_out_an_id_its_earlier_run_gave():
    """A node that heartbeats with an id from the coordinator's previous run must be unknown to the new one
    (it then joins again); were ids only counters, it would be taken for whoever holds that number now."""
    from swarm import messages as m
    from swarm.coordinator.members import Member, Membership

    def run():
        me = Member("n0", "coord", "127.0.0.1:1", "127.0.0.1:2", m.Resources(8 << 30, 8 << 30), None, is_self=True)
        return Membership(me, on_gone=lambda *a: None, on_change=lambda: None)

    request = m.JoinRequest("box", 7700, 7701, m.Resources(8 << 30, 8 << 30))
    before, after = run(), run()
    old = before.admit(request, "127.0.0.1:3", "127.0.0.1:4", unreachable=lambda x: False)
    new = after.admit(request, "127.0.0.1:5", "127.0.0.1:6", unreachable=lambda x: False)
    assert old.node_id != new.node_id
    assert after.known(old.node_id) is None and after.known(new.node_id) is new


def test_chat_samples_with_the_chat_defaults_unless_told_and_temperature_0_is_plain_greedy():
    """A chat's options fill in `CHAT_DEFAULTS` one by one; raw completion stays greedy; the command line
    passes on only the options the user typed."""
    import dataclasses

    from swarm.cli import build_parser
    from swarm.cli.options import sampling_options
    from swarm.client import SwarmClient
    from swarm.sampling import CHAT_DEFAULTS, SamplingParams

    def sampling(chat: bool, **options):
        return SwarmClient._request(dict(options), chat=chat, messages=(("user", "hi"),)).sampling

    assert sampling(True) == CHAT_DEFAULTS and not CHAT_DEFAULTS.greedy
    assert sampling(True, top_k=5, seed=3) == dataclasses.replace(CHAT_DEFAULTS, top_k=5, seed=3)
    assert sampling(True, temperature=0) == SamplingParams()  # greedy with no repeat penalty
    assert sampling(True, temperature=0, repeat_penalty=1.2) == SamplingParams(repeat_penalty=1.2)
    assert sampling(False) == SamplingParams() and SamplingParams().greedy
    assert sampling_options(build_parser().parse_args(["chat"])) == {}
    assert sampling_options(build_parser().parse_args(["local", "--temperature", "0"])) == {"temperature": 0.0}
    assert sampling_options(build_parser().parse_args(["generate", "x"]))["temperature"] == 0.0
