"""How the coordinator keeps a standby current (pure logic, with fakes for the nodes): each checkpoint
goes as it came (a delta when the standby holds what it builds on, else the whole state), a takeover
learns which deltas the standby still lacks, and every session sent to a standby is closed there once
it ends, also after a forward failed and after the standby took its range over. A standby that cannot
import what it held leaves the takeover to the coordinator's whole state.
The same path with real nodes and llama.cpp is tests/test_standby.py and tests/test_held.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from swarm import failover
from swarm import messages as m
from swarm.coordinator import checkpoints as checkpoints_module
from swarm.coordinator import standbys as standbys_module
from swarm.coordinator.checkpoints import Checkpoint
from swarm.coordinator.recovery import Recovery
from swarm.coordinator.stepping import Stepper
from swarm.coordinator.standbys import Standby, Standbys
from swarm.errors import BadInputError, KVStateError, UnreachableError
from swarm.layers import LayerRange

LAYERS = LayerRange(6, 12)


class _Peer:
    def __init__(self):
        self.sent: list[tuple[str, bytes]] = []
        self.closed: list[str] = []
        self.fail = False

    def import_state(self, state: m.ImportState, blob: bytes) -> int:
        if self.fail:
            raise UnreachableError("the standby did not answer")
        self.sent.append((state.mode, blob))
        return 0

    def close_session(self, sid: str) -> None:
        self.closed.append(sid)


class _Members:
    def get(self, node_id):
        return SimpleNamespace(node_id=node_id, name=node_id, state="ready")

    def name_of(self, node_id):
        return node_id


@pytest.fixture
def swarm(monkeypatch):
    """Standbys with one ready standby of LAYERS, the peer it talks to, and the running sessions."""
    monkeypatch.setattr(checkpoints_module, "join_kv", lambda blobs: b"|".join(blobs))  # a whole state, readable
    peer, running = _Peer(), {}
    sb = Standbys(_Members(), SimpleNamespace(route=lambda: ()), None, None, SimpleNamespace(of=lambda x: peer),
                  find=running.get)
    sb._by_range[LAYERS] = Standby(LAYERS, "spare", "holder", 1, "shard", state="ready")
    return sb, peer, running


def _chain(n: int, lineage: str = "a") -> list[Checkpoint]:
    out = [Checkpoint(100, lineage, b"w")]
    for i in range(1, n):
        out.append(Checkpoint(100 + i, lineage, b"d%d" % i, out[-1], i))
    return out


def _forward_waiting(sb: Standbys) -> None:
    while sb._queue:
        key = next(iter(sb._queue))
        sb._forward(key, *sb._queue.pop(key))


def test_each_checkpoint_goes_as_it_came_and_a_takeover_sends_only_what_the_standby_lacks(swarm):
    sb, peer, running = swarm
    running["s"] = SimpleNamespace(sid="s", epoch=0)
    chain = _chain(6)
    for c in chain[:2]:
        sb.offer(running["s"], LAYERS, c)
    _forward_waiting(sb)
    sb.offer(running["s"], LAYERS, chain[2])
    _forward_waiting(sb)
    assert peer.sent == [(m.HOLD, b"w"), (m.HOLD, b"d1"), (m.HOLD, b"d2")]
    assert sb.take(LAYERS) is not None
    sb.offer(running["s"], LAYERS, chain[3])  # after the takeover nothing more goes to it
    assert not sb._queue
    assert sb.catch_up("spare", LAYERS, "s", chain[2]) == []
    assert sb.catch_up("spare", LAYERS, "s", chain[5]) == [b"d3", b"d4", b"d5"]
    assert sb.catch_up("spare", LAYERS, "s", _chain(4, "b")[3]) is None  # another chain: the store's whole state
    assert sb.catch_up("spare", LAYERS, "other", chain[5]) is None  # nothing held of that session
    assert sb.catch_up("node-x", LAYERS, "s", chain[5]) is None  # not a standby that took over


def test_after_a_failed_forward_the_next_is_whole_and_the_session_is_still_closed_when_it_ends(swarm):
    sb, peer, running = swarm
    running["s"] = SimpleNamespace(sid="s", epoch=0)
    chain = _chain(4)
    sb.offer(running["s"], LAYERS, chain[0])
    _forward_waiting(sb)
    peer.fail = True
    sb.offer(running["s"], LAYERS, chain[1])
    _forward_waiting(sb)
    peer.fail = False
    sb.offer(running["s"], LAYERS, chain[2])
    _forward_waiting(sb)
    assert peer.sent == [(m.HOLD, b"w"), (m.HOLD, b"w|d1|d2")]  # the standby may hold anything: whole
    sb.take(LAYERS)
    assert sb.catch_up("spare", LAYERS, "s", chain[3]) == [b"d3"]
    sb._sweep()
    assert peer.closed == []  # still running
    del running["s"]
    sb._sweep()
    assert peer.closed == ["s"]  # also on a standby that took its range over


def test_a_session_whose_only_forward_failed_is_closed_on_the_standby_when_it_ends(swarm):
    sb, peer, running = swarm
    running["s"] = SimpleNamespace(sid="s", epoch=0)
    peer.fail = True
    sb.offer(running["s"], LAYERS, _chain(1)[0])
    _forward_waiting(sb)
    del running["s"]
    sb._sweep()
    assert peer.closed == ["s"]


def test_too_many_waiting_checkpoints_give_way_to_the_newest_sent_whole(swarm, monkeypatch):
    monkeypatch.setattr(standbys_module, "MAX_QUEUED", 3)
    sb, peer, running = swarm
    running["s"] = SimpleNamespace(sid="s", epoch=0)
    chain = _chain(6)
    sb.offer(running["s"], LAYERS, chain[0])
    _forward_waiting(sb)
    for c in chain[1:5]:  # the standby's link is slow: they wait
        sb.offer(running["s"], LAYERS, c)
    assert [c.positions for c in sb._queue[("s", LAYERS)][1]] == [104]
    _forward_waiting(sb)
    assert peer.sent == [(m.HOLD, b"w"), (m.HOLD, b"w|d1|d2|d3|d4")]
    sb.offer(running["s"], LAYERS, chain[5])
    _forward_waiting(sb)
    assert peer.sent[-1] == (m.HOLD, b"d5")


@pytest.mark.parametrize("refusal", [KVStateError("what it holds does not import"),
                                     BadInputError("a KV state refused by a remote node arrives as bad input")])
def test_a_standby_that_cannot_import_what_it_held_leaves_the_takeover_to_the_stores_whole_state(refusal):
    class Refusing:
        def import_state(self, state, blob):
            if state.mode == m.HELD:
                raise refusal
            return 0

    standbys = SimpleNamespace(catch_up=lambda node_id, layers, sid, c: [b"d1"])
    recovery = Recovery(None, None, None, None, SimpleNamespace(of=lambda hop: Refusing()), None, 512, standbys)
    hop = SimpleNamespace(node_id="spare", layers=LAYERS)
    assert recovery._from_held(SimpleNamespace(sid="s", epoch=1), hop, _chain(2)[1], 0) is False


def test_a_guarded_range_counts_what_a_replay_costs_per_step_not_only_its_compute():
    """A range that computes 2 ms a step would go 60 steps (0.12 s) between checkpoints; with a standby
    there is no load to wait for, so each step counts REPLAY_STEP_S more and it checkpoints every 25."""
    first, last = LayerRange(0, 6), LayerRange(12, 18)

    class Session:
        route = [SimpleNamespace(layers=r, is_self=False) for r in (first, LAYERS, last)]
        since: dict = {}
        pending: set = set()

        def take_pending(self):
            asked, self.pending = self.pending, set()
            return asked

        def ask_checkpoint(self, *layers):
            self.pending.update(layers)

    stepper = Stepper(None, True, failover.REPLAY_BUDGET_S, guarded=lambda: frozenset({LAYERS}))
    session, asked_at = Session(), {first: [], LAYERS: [], last: []}
    for step in range(1, 121):
        stepper.note_compute(session, m.StepResult(timings=tuple(m.HopTiming(r, compute_ms=2.0)
                                                                  for r in (first, LAYERS, last))))
        for r in session.pending:
            asked_at[r].append(step)
    # 0.12 s / (2 ms + 3 ms); the step after an ask carries the checkpoint, and counting starts again there
    assert asked_at[LAYERS] == [24, 49, 74, 99]
    assert asked_at[first] == asked_at[last] == []  # unguarded: 0.3 s of compute alone, 150 steps
