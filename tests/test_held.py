"""A standby holds a session's checkpoints as they came (a whole state, then deltas) and imports them only
when it takes over: real llama.cpp and Gemma 3 270M's last shard (the one that samples), through the node's
own import handler (`Handover.import_state` with `m.HOLD` and `m.HELD`).

What it imports at the takeover must compute exactly what the shard that took the checkpoints computes
next, past the 512-position sliding window too, and a chain longer than MAX_LINKS (put together on the
way) as well. Wrong pieces are refused with a clear error, and what was held before them stays usable;
the node drops what it holds when a session closes, is imported whole, or is abandoned, and holds at most
twice its session slots.
"""

from __future__ import annotations

import numpy as np
import pytest

from swarm import messages as m
from swarm.engine import Shard, kv_header
from swarm.errors import BadInputError, KVStateError
from swarm.layers import LayerRange
from swarm.node import held as held_module
from swarm.node.handover import Handover
from swarm.node import service as service_module
from swarm.node.service import Node
from swarm.node.shards import LoadedShard
from swarm.slicing import slice_model

N_CTX = 1280
LAST = LayerRange(12, 18)
STEPS = [512, 512, 3, 1, 1, 200, 1, 1]  # prompt batches, then decode steps, past the window


class _Shelf:
    def __init__(self, entry: LoadedShard):
        self._entry = entry

    def entry(self, layers: LayerRange) -> LoadedShard:
        assert layers == self._entry.shard.layers
        return self._entry

    def entries(self) -> list[LoadedShard]:
        return [self._entry]


def _settings() -> m.ContextSettings:
    return m.ContextSettings(n_ctx=N_CTX, max_sessions=2, n_batch=512)


@pytest.fixture(scope="module")
def path(model_path):
    return slice_model(model_path, LAST).path


@pytest.fixture
def pair(path):
    """The shard that serves (and checkpoints) and a standby of it behind the node's import handler."""
    with Shard(path, n_ctx=N_CTX, max_sessions=2) as serving, Shard(path, n_ctx=N_CTX, max_sessions=2) as standby:
        entry = LoadedShard("spec", standby, _settings())
        yield serving, entry, Handover(_Shelf(entry), peers=None, touch=lambda sid: None)


def _x(shard: Shard, rng, n: int) -> np.ndarray:
    return rng.standard_normal((n, shard.n_embd)).astype(np.float32)


def _checkpoints(shard: Shard, rng, steps=STEPS) -> tuple[list[bytes], int]:
    shard.open_session("s")
    chain, base, pos = [], None, 0
    for n in steps:
        shard.forward("s", _x(shard, rng, n), pos)
        pos += n
        blob, _, base = shard.checkpoint_kv("s", base)
        chain.append(blob)
    return chain, pos


def _hold(handover: Handover, blob: bytes, sid: str = "s") -> int:
    return handover.import_state(m.ImportState(sid, LAST, mode=m.HOLD), blob)


def _take_over(handover: Handover, entry: LoadedShard, sid: str = "s") -> int:
    if sid not in entry.shard.sessions():
        entry.shard.open_session(sid)
    return handover.import_state(m.ImportState(sid, LAST, mode=m.HELD), b"")


def test_what_a_standby_held_imports_into_exactly_the_serving_shards_next_step(pair):
    serving, entry, handover = pair
    rng = np.random.default_rng(1)
    chain, pos = _checkpoints(serving, rng)
    assert all(len(d) < len(chain[0]) / 50 for d, n in zip(chain[1:], STEPS[1:]) if n == 1)  # deltas are small
    for i, blob in enumerate(chain):
        assert _hold(handover, blob) == kv_header(blob)["n_past"]
        assert entry.held.holds("s") == (kv_header(blob)["n_past"], kv_header(chain[0])["lineage"])
    assert entry.shard.sessions() == {}  # holding imports nothing
    assert _take_over(handover, entry) == pos
    assert entry.held.holds("s") == (0, "")  # imported: no longer held
    for _ in range(3):
        x = _x(serving, rng, 1)
        assert np.array_equal(serving.forward("s", x, pos), entry.shard.forward("s", x, pos))
        pos += 1


def test_a_long_chain_is_put_together_on_the_way_and_stays_exact(pair, monkeypatch):
    monkeypatch.setattr(held_module, "MAX_LINKS", 3)
    serving, entry, handover = pair
    rng = np.random.default_rng(2)
    chain, pos = _checkpoints(serving, rng, [300] + [1] * 9)
    for blob in chain:
        _hold(handover, blob)
    assert len(entry.held._chains["s"].blobs) <= 4
    assert _take_over(handover, entry) == pos
    x = _x(serving, rng, 1)
    assert np.array_equal(serving.forward("s", x, pos), entry.shard.forward("s", x, pos))


def test_wrong_pieces_are_refused_and_what_was_held_stays_usable(pair, model_path):
    serving, entry, handover = pair
    rng = np.random.default_rng(3)
    chain, pos = _checkpoints(serving, rng, [40, 1, 1, 1])
    _hold(handover, chain[0])
    with pytest.raises(KVStateError, match="send the whole state"):
        _hold(handover, chain[2])  # skips the delta it builds on
    with pytest.raises(KVStateError, match="send the whole state"):
        _hold(handover, chain[1], sid="other")  # a delta of nothing held
    damaged = bytearray(chain[1])
    damaged[-1] ^= 1
    with pytest.raises(KVStateError, match="checksum"):
        _hold(handover, bytes(damaged))
    with Shard(slice_model(model_path, LayerRange(6, 12)).path, n_ctx=N_CTX, max_sessions=2) as other:
        other.open_session("s")
        other.forward("s", _x(other, rng, 40), 0)
        with pytest.raises(KVStateError, match="another shard"):
            _hold(handover, other.export_kv("s"))
    with pytest.raises(BadInputError, match="unknown import mode"):
        handover.import_state(m.ImportState("s", LAST, mode="later"), chain[1])
    with pytest.raises(BadInputError, match="without kept outputs"):
        handover.import_state(m.ImportState("s", LAST, mode=m.HOLD, kept=(m.KeptStep(0, (1,), b"x"),)), chain[1])
    with pytest.raises(BadInputError, match="not open"):
        handover.import_state(m.ImportState("s", LAST, mode=m.HELD), b"")
    entry.shard.open_session("s")
    with pytest.raises(BadInputError, match="no state of its own"):
        handover.import_state(m.ImportState("s", LAST, mode=m.HELD), chain[1])
    entry.shard.open_session("nothing")
    with pytest.raises(KVStateError, match="holds no KV state"):
        handover.import_state(m.ImportState("nothing", LAST, mode=m.HELD), b"")
    for blob in chain[1:]:  # nothing refused above changed what is held
        _hold(handover, blob)
    with pytest.raises(BadInputError, match="kept outputs"):  # an import of it that is refused keeps it held
        handover.import_state(m.ImportState("s", LAST, mode=m.HELD, kept=(m.KeptStep(0, (1,), b"x"),)), b"")
    assert entry.held.holds("s")[0] == pos
    assert _take_over(handover, entry) == pos
    x = _x(serving, rng, 1)
    assert np.array_equal(serving.forward("s", x, pos), entry.shard.forward("s", x, pos))


def test_a_node_drops_what_is_held_when_the_session_closes_or_imports_but_not_when_it_reopens(pair):
    serving, entry, _ = pair
    node = Node(peers=None)  # the node's own session handling, on this one shard
    node.shelf = _Shelf(entry)
    node._handover = Handover(node.shelf, peers=None, touch=node._touch)
    chain, pos = _checkpoints(serving, np.random.default_rng(4), [20])
    hold = m.ImportState("s", LAST, mode=m.HOLD)
    assert node.import_state(hold, chain[0]) == pos
    node.open_session(m.OpenSession("s", LAST))
    assert entry.held.holds("s")[0] == pos  # (re)opening the session keeps it: the takeover opens it first
    node.close_session("s")
    assert entry.held.holds("s") == (0, "") and entry.held.nbytes() == 0
    node.import_state(hold, chain[0])
    node.open_session(m.OpenSession("s", LAST))
    with pytest.raises(BadInputError):  # a refused import leaves what is held alone
        node.import_state(m.ImportState("s", LAST, kept=(m.KeptStep(0, (1,), b"x"),)), chain[0])
    assert entry.held.holds("s")[0] == pos
    assert node.import_state(m.ImportState("s", LAST), chain[0]) == pos  # handed over whole: supersedes it
    assert entry.held.holds("s") == (0, "")


def test_a_standby_holds_at_most_twice_its_sessions_and_ages_out_what_no_one_names(pair, monkeypatch):
    serving, entry, _ = pair
    node = Node(peers=None)
    node.shelf = _Shelf(entry)
    node._handover = Handover(node.shelf, peers=None, touch=node._touch)
    chain, _ = _checkpoints(serving, np.random.default_rng(5), [20])
    for i in range(4):  # max_sessions 2
        node.import_state(m.ImportState(f"s{i}", LAST, mode=m.HOLD), chain[0])
    with pytest.raises(KVStateError, match="holds 4 sessions, its most"):
        node.import_state(m.ImportState("s4", LAST, mode=m.HOLD), chain[0])
    node.import_state(m.ImportState("s3", LAST, mode=m.HOLD), chain[0])  # one it holds: still taken
    node._last_used["s0"] -= 2 * service_module.SESSION_IDLE_S  # abandoned by its coordinator
    node.import_state(m.ImportState("s4", LAST, mode=m.HOLD), chain[0])
    assert entry.held.holds("s0") == (0, "") and entry.held.holds("s4")[0] == 20
