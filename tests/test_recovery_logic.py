"""Pure recovery logic: what a shard keeps for the next hop, who takes a lost range, when to checkpoint,
flapping back-off, and the seeded sampler that a successor rebuilds (no network, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from swarm import failover
from swarm.errors import BadInputError, KVStateError
from swarm.layers import LayerRange
from swarm.failover import Candidate, Recovery, backoff_s, choose_successor, should_checkpoint
from swarm.messages import KeptStep
from swarm.node.kept import OutputLog
from swarm.sampling import Sampler, SamplingParams


def _step(start: int, n: int = 1) -> KeptStep:
    return KeptStep(start, tuple(range(start, start + n)), bytes(8 * n))


def test_kept_steps_keep_their_batches_and_let_go_at_the_checkpoint():
    log = OutputLog()
    log.add("s", _step(0, 5), keep_from=0)  # a prompt of 5 in one batch
    for p in range(5, 9):
        log.add("s", _step(p), keep_from=0)
    assert [(s.start, len(s.tokens)) for s in log.steps("s", 0, 9)] == [(0, 5), (5, 1), (6, 1), (7, 1), (8, 1)]
    log.add("s", _step(9), keep_from=7)  # the next hop checkpointed at 7
    assert [s.start for s in log.steps("s", 7, 10)] == [7, 8, 9]
    with pytest.raises(KVStateError, match="recomputed"):
        log.steps("s", 0, 10)
    assert log.nbytes("s") == 3 * 8


def test_kept_steps_follow_a_rewind_and_a_step_sent_again():
    log = OutputLog()
    for p in range(4):
        log.add("s", _step(p), keep_from=0)
    log.truncate("s", 2)
    assert [s.start for s in log.all("s")[0]] == [0, 1]
    log.add("s", _step(2), keep_from=0)
    log.add("s", _step(2), keep_from=0)  # the same step again after a failed attempt replaces it
    assert [s.start for s in log.all("s")[0]] == [0, 1, 2]
    with pytest.raises(KVStateError):
        log.steps("s", 0, 4)  # position 3 is gone


def test_kept_steps_over_budget_lose_the_oldest_and_say_so():
    log = OutputLog(session_budget=3 * 8)
    for p in range(5):
        log.add("s", _step(p), keep_from=0)
    assert [s.start for s in log.all("s")[0]] == [2, 3, 4]
    assert [s.start for s in log.steps("s", 2, 5)] == [2, 3, 4]
    with pytest.raises(KVStateError):
        log.steps("s", 1, 5)
    log.drop("s")
    assert log.nbytes() == 0 and log.all("s") == ([], 0)


def test_a_migrated_log_is_complete_from_where_it_says():
    log = OutputLog()
    log.replace("s", [_step(4), _step(5)], first=4)
    assert len(log.steps("s", 4, 6)) == 2
    with pytest.raises(KVStateError):
        log.steps("s", 3, 6)


def _cand(node_id, free=1000, has_file=False, step_s=0.01, serves_route=False):
    return Candidate(node_id, node_id, free, has_file, step_s, serves_route)


def test_successor_needs_memory_then_prefers_the_file_then_speed():
    assert choose_successor(500, [_cand("a", free=400)]) is None
    assert choose_successor(500, [_cand("a", step_s=0.001), _cand("b", has_file=True, step_s=0.02)]).node_id == "b"
    assert choose_successor(500, [_cand("a", step_s=0.02), _cand("b", step_s=0.01)]).node_id == "b"
    assert choose_successor(500, [_cand("b"), _cand("a", serves_route=True)]).node_id == "a"
    assert choose_successor(500, [_cand("b"), _cand("a")]).node_id == "a"  # deterministic on ties


def test_checkpoint_when_a_rebuild_would_replay_too_much():
    assert not should_checkpoint(failover.REPLAY_BUDGET_S * 0.9)
    assert should_checkpoint(failover.REPLAY_BUDGET_S)


def test_flapping_nodes_back_off_longer_each_time():
    now = 1000.0
    assert backoff_s([now - 10], now) == 0.0
    first = backoff_s([now - 20, now - 10], now)
    assert first == failover.FLAP_BACKOFF_S
    assert backoff_s([now - 30, now - 20, now - 10], now) == 2 * first
    assert backoff_s([now - 2 * failover.FLAP_WINDOW_S, now - 10], now) == 0.0  # old losses are forgiven


def test_a_recovery_record_shows_the_dearest_path_and_longest_stall():
    r = Recovery("n1", "10.0.0.2:1", (), "call failed")
    r.add_session(failover.REPLAY, 0.2, 30)
    r.add_session(failover.RECOMPUTE, 0.1, 100)
    r.add_session(failover.MIGRATE, 0.5, 0)
    assert (r.path, r.sessions, r.stall_s, r.replayed_positions) == ("recompute", 3, 0.5, 130)


def test_a_rebuilt_sampler_draws_what_the_lost_one_would_have():
    logits = np.log(np.array([0.3, 0.25, 0.2, 0.15, 0.1], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    first = Sampler(params)
    run = [first.sample(logits, position=p) for p in range(40)]
    again = Sampler(params)  # a successor's sampler, starting at position 25
    assert [again.sample(logits, position=p) for p in range(25, 40)] == run[25:]
    assert len(set(run)) > 1


def test_a_step_observed_twice_counts_once_for_the_repeat_penalty():
    params = SamplingParams(repeat_penalty=1.5, repeat_last_n=4)
    once, twice = Sampler(params), Sampler(params)
    once.observe([1, 2, 3], 0)
    once.observe([4], 3)
    twice.observe([1, 2, 3], 0)
    twice.observe([4], 3)  # the step that failed further on ...
    twice.observe([4], 3)  # ... and ran again
    assert twice.recent == once.recent and twice.end == once.end == 4
    twice.rewind(2)  # a recovery cut the session back
    assert twice.recent == [1, 2] and twice.end == 2
    successor = Sampler(params, history=[1, 2, 3])  # rebuilt elsewhere at position 3
    successor.observe([4], 3)
    assert successor.recent == once.recent


def test_kv_states_cross_the_wire_in_pieces_and_come_back_whole():
    from swarm import messages as m
    from swarm.wire import convert as cv

    blob = bytes(range(256)) * (3 * cv.KV_PIECE // 256 + 7)
    kept = tuple(m.KeptStep(i, (i,), bytes(cv.KV_PIECE // 2)) for i in range(3))
    state = m.ImportState("s", LayerRange(6, 12), keep_from=4, epoch=2, kept=kept)
    pieces = list(cv.import_pieces(state, blob))
    assert len(pieces) == 4 + 2 and all(len(p.kv) <= cv.KV_PIECE for p in pieces)
    got, whole = cv.import_of(iter(pieces))
    assert whole == blob and got == state
    empty, nothing = cv.checkpoint_of(cv.checkpoint_pieces(m.Checkpoint("c", LayerRange(0, 6), 0), b""))
    assert (empty.session, nothing) == ("c", b"")
    with pytest.raises(BadInputError, match="at least one message"):
        cv.checkpoint_of(iter([]))
