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
    got = choose_standbys(ROUTE, spares, on_route_too=True)
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
    assert choose_standbys([Guarded(LAST, 380 * MB, "c")], spares, on_route_too=True) == {LAST: "idle"}


def test_only_nodes_off_the_route_stand_by_unless_asked():
    """By default a node that serves a range never stands by (the imports would take its steps' cores)."""
    route = [Guarded(LAST, 380 * MB, "c"), Guarded(MIDDLE, 40 * MB, "m")]
    spares = [Spare("b", 4000 * MB, on_route=True), Spare("idle", 400 * MB, on_route=False)]
    assert choose_standbys(route, spares) == {LAST: "idle"}  # the middle range stays unguarded
    assert choose_standbys(route, spares, on_route_too=True) == {LAST: "idle", MIDDLE: "b"}
    assert choose_standbys(route, spares[:1]) == {}


def test_a_range_without_a_size_is_refused():
    with pytest.raises(BadInputError, match="positive size"):
        choose_standbys([Guarded(LAST, 0, "c")], [Spare("idle", 400 * MB, False)])


def _member_list():
    from swarm import messages as m
    from swarm.coordinator.members import Member, Membership

    me = Member("n0", "coord", "127.0.0.1:1", "127.0.0.1:2", m.Resources(), None, is_self=True)
    return Membership(me, lambda *a: None, lambda: None), m


def test_a_node_with_a_leave_after_deadline_or_past_losses_counts_as_less_reliable():
    members, m = _member_list()
    ok = lambda x: False  # noqa: E731 (nobody's pin is contested here)
    steady = members.admit(m.JoinRequest("steady", 10, 11, m.Resources()), "127.0.0.1:10", "127.0.0.1:11", ok)
    notebook = members.admit(m.JoinRequest("notebook", 20, 21, m.Resources(), leave_after_s=3600.0),
                             "127.0.0.1:20", "127.0.0.1:21", ok)
    assert members.risk(steady.node_id, steady.address) == 0
    assert members.risk(notebook.node_id, notebook.address) == 1
    members.remove(steady.node_id, "missed its heartbeats", "missed heartbeats")
    again = members.admit(m.JoinRequest("steady", 10, 11, m.Resources()), "127.0.0.1:10", "127.0.0.1:11", ok)
    assert members.risk(again.node_id, again.address) == 1  # lost once before


def test_a_join_with_an_impossible_leave_after_is_refused():
    from swarm.coordinator.members import check_join

    _, m = _member_list()
    for bad in (-1.0, float("nan"), 1e12):
        with pytest.raises(BadInputError, match="--leave-after"):
            check_join(m.JoinRequest("x", 10, 11, m.Resources(), leave_after_s=bad), 18)


def test_the_leave_deadline_and_the_standbys_cross_the_wire():
    from swarm.layers import LayerRange as R
    from swarm.wire import convert, convert_client

    _, m = _member_list()
    j = m.JoinRequest("nb", 10, 11, m.Resources(), leave_after_s=41400.0)
    assert convert.join_of(convert.join_pb(j)).leave_after_s == 41400.0
    assert convert.load_of(convert.load_pb(m.Load(None, drop=R(12, 18)))) == m.Load(None, drop=R(12, 18))
    assert convert.load_of(convert.load_pb(m.Load(None))).drop is None
    report = m.StatusReport("s", "model", 18, "ready", "", 512, 4, standbys=(
        m.StandbyReport(R(12, 18), "coord", "node2", 300 << 20, "ready", 7),))
    (b,) = convert_client.status_dict(convert_client.status_pb(report))["standbys"]
    assert b["layers"] == {"start": 12, "end": 18} and (b["node"], b["guards"], b["state"]) == ("coord", "node2",
                                                                                               "ready")
    assert int(b["bytes"]) == 300 << 20 and int(b["checkpoints"]) == 7


def test_a_node_that_holds_the_shard_file_is_preferred_so_nothing_is_transferred():
    route = [Guarded(LAST, 380 * MB, "c", shard_id="last")]
    spares = [Spare("b", 4000 * MB, True), Spare("coord", 1000 * MB, True, files=None),
              Spare("a", 3000 * MB, True, files=frozenset({"last"}))]
    assert choose_standbys(route, spares, on_route_too=True) == {LAST: "a"}  # the most room among those with the file
    assert choose_standbys(route, spares[:2], on_route_too=True) == {LAST: "coord"}  # the coordinator holds every file
    assert choose_standbys(route, spares[:1] + [Spare("idle", 400 * MB, False)], on_route_too=True) == {LAST: "idle"}


def test_a_node_never_stands_by_for_a_range_it_serves_already():
    # The coordinator took LAST over from its lost node: until the route changes, LAST still names that node.
    got = choose_standbys(ROUTE, [Spare("coord", 1 << 40, on_route=False, files=None, serves=frozenset({LAST}))])
    assert LAST not in got and set(got) == {r.layers for r in ROUTE} - {LAST}
