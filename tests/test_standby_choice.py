"""Who stands by for which range (`failover.choose_standbys`, a pure function: no network, no model)."""

from __future__ import annotations

import pytest

from swarm.errors import BadInputError
from swarm.failover import Guarded, Spare, choose_standbys
from swarm.layers import LayerRange

MB = 1 << 20
FIRST, MIDDLE, LAST = LayerRange(0, 6), LayerRange(6, 12), LayerRange(12, 18)
# The default model's shape: the last range carries the vocabulary head (its successor loads most).
ROUTE = [Guarded(FIRST, 230 * MB, "a"), Guarded(MIDDLE, 40 * MB, "b"), Guarded(LAST, 380 * MB, "c")]


def test_the_range_whose_loss_loads_most_is_guarded_first():
    got = choose_standbys(ROUTE, [Spare("idle", 400 * MB, on_route=False)])
    assert got == {LAST: "idle"}  # 400 MB holds the 380 MB last range, nothing more


def test_memory_caps_are_respected_across_several_standbys():
    spares = [Spare("idle", 430 * MB, on_route=False), Spare("b", 250 * MB, on_route=True)]
    got = choose_standbys(ROUTE, spares)
    assert got == {LAST: "idle", FIRST: "b", MIDDLE: "idle"}  # 380 + 40 on idle, 230 on b
    for node, cap in (("idle", 430 * MB), ("b", 250 * MB)):
        assert sum(r.need_bytes for r in ROUTE if got.get(r.layers) == node) <= cap


def test_nothing_when_no_node_has_memory_to_spare():
    assert choose_standbys(ROUTE, [Spare("a", 10 * MB, True), Spare("b", 0, True), Spare("c", -5 * MB, True)]) == {}
    assert choose_standbys(ROUTE, []) == {}
    assert choose_standbys([], [Spare("idle", 1 << 40, False)]) == {}


def test_a_node_never_stands_by_for_its_own_range():
    got = choose_standbys([Guarded(LAST, 380 * MB, "c")], [Spare("c", 1 << 40, on_route=True)])
    assert got == {}


def test_an_unreliable_holder_is_guarded_before_a_bigger_range():
    route = [Guarded(FIRST, 230 * MB, "a", risk=2), Guarded(LAST, 380 * MB, "c")]
    assert choose_standbys(route, [Spare("idle", 400 * MB, False)]) == {FIRST: "idle"}


def test_a_node_off_the_route_is_preferred_so_the_route_keeps_its_cores():
    spares = [Spare("b", 4000 * MB, on_route=True), Spare("idle", 400 * MB, on_route=False)]
    assert choose_standbys([Guarded(LAST, 380 * MB, "c")], spares) == {LAST: "idle"}


def test_a_range_without_a_size_is_refused():
    with pytest.raises(BadInputError, match="positive size"):
        choose_standbys([Guarded(LAST, 0, "c")], [Spare("idle", 400 * MB, False)])
