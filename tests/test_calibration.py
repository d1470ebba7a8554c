"""The pure parts of measuring and correcting a node's speed: probe contention and trust, the head's
cost, the probe's arithmetic, and online calibration from observed steps."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from swarm import calibration as cal
from swarm import planner, profiling
from swarm.calibration import Calibration, CalibrationPolicy, assess, corrected, observe, probed
from swarm.layers import LayerRange
from swarm.placement import Footprint, PlacementError
from swarm.planner import NodeProfile, predict
from swarm.placement import Assignment
from swarm.profiling import ComputeProfile, CpuSample, contention, trusted

MB = 10**6


def footprint(layer_params=(), head_params=0) -> Footprint:
    """4 layers of 4 MB and a 178 MB tied head, like Gemma 3 270M's Q4_K blocks and Q8_0 embeddings."""
    return Footprint(n_layer=4, layer_bytes=(4 * MB,) * 4, embed_bytes=178 * MB, embed_row_bytes=680,
                     output_bytes=0, norm_bytes=2560, kv_bytes_per_position=(4096,) * 4, n_vocab=262144,
                     n_embd=640, layer_params=layer_params, head_params=head_params)


# ---------------------------------------------------------------- contention and trust


def sample(wall, own, busy, cpus=2):
    return CpuSample(wall_s=wall, own_s=own, busy_s=busy, cpus=cpus)


def test_contention_is_the_share_of_the_team_others_took():
    # 1 s, two CPUs both busy, this process used 1 CPU-second: the other process took one of the team's two.
    assert contention(sample(0, 0, 0), sample(1, 1.0, 2.0), threads=2) == pytest.approx(0.5)
    # Only this process was busy.
    assert contention(sample(0, 0, 0), sample(1, 2.0, 2.0), threads=2) == pytest.approx(0.0)
    # A 1-thread team on 2 CPUs: another process on the spare CPU takes nothing from it ...
    assert contention(sample(0, 0, 0), sample(1, 1.0, 2.0), threads=1) == pytest.approx(0.0)
    # ... two other busy CPUs' worth (on 4 CPUs, team of 2) take one of its two.
    assert contention(sample(0, 0, 0, 4), sample(1, 2.0, 5.0, 4), threads=2) == pytest.approx(0.5)
    # Clock ticks can make own time exceed busy time: never negative; never above 1.
    assert contention(sample(0, 0, 0), sample(1, 2.1, 2.0), threads=2) == 0.0
    assert contention(sample(0, 0, 0), sample(1, 0.0, 9.0), threads=2) == 1.0
    # Unknown counters (not Linux) or no time passed: unknown.
    assert contention(sample(0, 0, None), sample(1, 1.0, None), threads=2) is None
    assert contention(sample(1, 0, 0), sample(1, 1.0, 2.0), threads=2) is None


def test_cpu_sample_reads_this_machine():
    s = profiling.cpu_sample()
    assert s.cpus >= 1 and s.own_s >= 0
    if s.busy_s is not None:  # Linux
        assert s.busy_s > 0


def test_a_profile_measured_busy_or_long_ago_is_not_trusted():
    now = 1_800_000_000.0
    quiet = ComputeProfile(1e-10, 1e-11, 0.0, contention=0.02, measured_at=now - 3600)
    assert trusted(quiet, now)
    assert not trusted(dataclasses.replace(quiet, contention=0.5), now)  # measured beside other work
    assert not trusted(dataclasses.replace(quiet, measured_at=now - 8 * 86400), now)  # a week and more ago
    assert not trusted(dataclasses.replace(quiet, measured_at=now + 86400), now)  # clock went back
    assert not trusted(dataclasses.replace(quiet, measured_at=0.0), now)  # when: unknown
    assert trusted(dataclasses.replace(quiet, contention=None), now)  # no counters here: age decides


# ---------------------------------------------------------------- the probe's arithmetic


@pytest.fixture
def fake_probe(monkeypatch, tmp_path):
    """measure_compute with made-up shards: 1 and 7 middle layers of 4 MB, and a last shard of 2 layers
    and a 178 MB head; step times from a line (0.1 ms + 0.07 ns/byte) and the head at 0.045 ns/byte."""
    blocks = {"a": 4 * MB, "b": 28 * MB, "last": 8 * MB}
    heads = {"a": 0, "b": 0, "last": 178 * MB}
    monkeypatch.setattr(profiling, "weight_bytes", lambda p: blocks[p])
    monkeypatch.setattr(profiling, "head_bytes", lambda p: heads[p])
    monkeypatch.setattr(profiling, "wait_quiet", lambda threads, deadline: 0.0)
    slow = {"factor": [1.0], "contention": [0.0]}

    def time_shards(paths, threads, steps, tokens):
        f = slow["factor"][0]
        return [(f * (1e-4 + 0.07e-9 * blocks[p] + 0.045e-9 * heads[p]), f * 128 * 0.02e-9 * blocks[p])
                for p in paths]

    def fake_contention(before, after, threads):
        c = slow["contention"][0]
        if len(slow["contention"]) > 1:  # one value per probe attempt
            slow["contention"].pop(0)
            slow["factor"].pop(0)
        return c

    monkeypatch.setattr(profiling, "_time_shards", time_shards)
    monkeypatch.setattr(profiling, "contention", fake_contention)
    return slow


def test_probe_fits_the_blocks_and_measures_the_head_apart(fake_probe):
    p = profiling.measure_compute(["a", "b", "last"], 2)
    assert p.step_overhead_s == pytest.approx(1e-4)
    assert p.decode_s_per_byte == pytest.approx(0.07e-9)
    assert p.head_s_per_byte == pytest.approx(0.045e-9)
    assert p.prefill_s_per_byte == pytest.approx(0.02e-9)
    assert p.contention == 0.0 and p.measured_at > 0
    # Without a last shard the head is not measured (the planner then estimates it).
    assert profiling.measure_compute(["a", "b"], 2).head_s_per_byte is None
    with pytest.raises(profiling.BadInputError, match="middle slice"):
        profiling.measure_compute(["last"], 2)


def test_a_disturbed_probe_runs_again_and_the_least_disturbed_counts(fake_probe):
    # First attempt: others took 60% and everything ran 2x slower; the second was quiet.
    fake_probe["factor"][:] = [2.0, 1.0, 1.0]
    fake_probe["contention"][:] = [0.6, 0.02, 0.02]
    p = profiling.measure_compute(["a", "b"], 2)
    assert p.decode_s_per_byte == pytest.approx(0.07e-9) and p.contention == 0.02
    # Never quiet: the least disturbed of PROBE_ATTEMPTS, and it says so.
    fake_probe["factor"][:] = [2.0, 1.5, 3.0, 1.0]
    fake_probe["contention"][:] = [0.6, 0.3, 0.7, 0.0]
    p = profiling.measure_compute(["a", "b"], 2)
    assert p.decode_s_per_byte == pytest.approx(1.5 * 0.07e-9) and p.contention == 0.3
    assert not trusted(p, p.measured_at)


def test_cached_profiles_are_measured_again_when_untrusted(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(profiling, "machine_fingerprint", lambda: "test-machine")
    now = profiling.time.time()
    runs = []

    def measure(c):
        def run():
            runs.append(c)
            return ComputeProfile(1e-10, 1e-11, 0.0, contention=c, measured_at=now)
        return run

    p, cached = profiling.cached_compute(["s1"], 2, measure(0.5), params=(32, 128))
    assert not cached and p.contention == 0.5
    p, cached = profiling.cached_compute(["s1"], 2, measure(0.01), params=(32, 128))  # busy: again
    assert not cached and p.contention == 0.01
    p, cached = profiling.cached_compute(["s1"], 2, measure(0.0), params=(32, 128))  # quiet: kept
    assert cached and p.contention == 0.01 and runs == [0.5, 0.01]
    # A profile of the previous format (no contention, no time) under the same name is not misread:
    # the key carries PROFILE_FORMAT, and the old fields alone would be too old to trust anyway.
    (f,) = (tmp_path / "profiles").glob("*.json")
    f.write_text(json.dumps({"decode_s_per_byte": 1.0, "prefill_s_per_byte": 1.0, "step_overhead_s": 0.0}))
    p, cached = profiling.cached_compute(["s1"], 2, measure(0.0), params=(32, 128))
    assert not cached and p.decode_s_per_byte == 1e-10


# ---------------------------------------------------------------- the head in the planner


def test_the_head_costs_what_was_probed_else_the_blocks_cost_per_weight():
    # 4 MB blocks of 6 M weights (0.67 bytes/weight), a 178 MB head of 168 M weights (1.06 bytes/weight).
    fp = footprint(layer_params=(6_000_000,) * 4, head_params=168_000_000)
    factor = (4 / 6) / (178 / 168)
    assert planner.head_cost_factor(fp) == pytest.approx(factor)
    assert planner.head_cost_factor(footprint()) == 1.0  # no weight counts: per byte, as the blocks
    node = NodeProfile("n", 10**9, 0.07e-9, 0.02e-9, step_overhead_s=1e-4)
    last = LayerRange(2, 4)
    assert planner.hop_decode_s(fp, node, last) == pytest.approx(1e-4 + 0.07e-9 * (8 * MB + factor * 178 * MB))
    assert planner.hop_decode_s(footprint(), node, last) == pytest.approx(1e-4 + 0.07e-9 * 186 * MB)
    headed = dataclasses.replace(node, head_s_per_byte=0.045e-9)
    assert planner.hop_decode_s(fp, headed, last) == pytest.approx(1e-4 + 0.07e-9 * 8 * MB + 0.045e-9 * 178 * MB)
    assert planner.hop_decode_s(fp, headed, LayerRange(0, 2)) == pytest.approx(1e-4 + 0.07e-9 * 8 * MB)
    route = [Assignment("n", LayerRange(0, 4))]
    assert predict(fp, [headed], route).decode_s == pytest.approx(planner.hop_decode_s(fp, headed, LayerRange(0, 4)))
    with pytest.raises(PlacementError, match="head_s_per_byte"):
        planner.plan_measured(fp, [dataclasses.replace(node, head_s_per_byte=-1.0)], 512, 1)


# ---------------------------------------------------------------- online calibration

POLICY = CalibrationPolicy(window=8, min_steps=4, deadband=0.10, reprobe_at=0.25, cooldown_s=100.0,
                           max_cooldown_s=250.0)


def steps(c: Calibration, ratio: float, n: int) -> Calibration:
    return observe(c, [0.01] * n, [0.01 * ratio] * n, POLICY)


def test_nothing_happens_before_enough_steps():
    c = steps(Calibration(), 2.0, 3)
    v = assess(c, 0.0, POLICY)
    assert v.ratio is None and v.scale == 1.0 and not v.changed and not v.reprobe


def test_the_median_ratio_scales_the_decode_cost_beyond_the_deadband():
    c = steps(Calibration(), 1.05, 4)  # within 10%: the probe stands
    v = assess(c, 0.0, POLICY)
    assert v.ratio == pytest.approx(1.05) and v.scale == 1.0 and not v.changed and not v.reprobe
    c = steps(v.calibration, 1.2, 8)  # 20% slower than probed: corrected, not yet re-probed
    v = assess(c, 0.0, POLICY)
    assert v.scale == pytest.approx(1.2) and v.changed and not v.reprobe
    # Noise around the new scale does not move it (hysteresis), so the swarm is not re-planned.
    c = observe(v.calibration, [0.01] * 8, [0.0125, 0.0115, 0.0122, 0.0118, 0.0125, 0.0121, 0.0119, 0.013], POLICY)
    v2 = assess(c, 0.0, POLICY)
    assert v2.scale == pytest.approx(1.2) and not v2.changed
    # A robust median: a few slow steps (a burst of other work) do not count.
    c = observe(v2.calibration, [0.01] * 8, [0.012] * 6 + [0.1] * 2, POLICY)
    assert assess(c, 0.0, POLICY).scale == pytest.approx(1.2)


def test_a_far_prediction_asks_for_a_new_probe_with_a_growing_cooldown():
    c = steps(Calibration(), 0.4, 8)  # the profile was measured on a busy machine: 2.5x too slow
    v = assess(c, 0.0, POLICY)
    assert v.scale == pytest.approx(0.4) and v.reprobe and v.changed
    assert assess(v.calibration, 1.0, POLICY).reprobe  # still asked for until the probe is done
    c = probed(v.calibration, now=10.0)  # the coordinator probed again: fresh start
    assert c.ratios == () and c.scale == 1.0
    # The new probe still disagrees (the machine is busy whenever it serves): corrected at once,
    # probed again only after the cooldown, then after twice as long, up to the maximum.
    c = steps(c, 1.5, 8)
    v = assess(c, 50.0, POLICY)
    assert v.scale == pytest.approx(1.5) and not v.reprobe
    assert assess(c, 110.0, POLICY).reprobe
    c = steps(probed(c, 110.0), 1.5, 8)
    assert not assess(c, 250.0, POLICY).reprobe and assess(c, 310.0, POLICY).reprobe
    c = steps(probed(c, 310.0), 1.5, 8)
    assert not assess(c, 500.0, POLICY).reprobe and assess(c, 560.0, POLICY).reprobe  # capped at 250 s
    # Once the steps agree with a probe, the cooldown is back to its start.
    c = steps(probed(c, 560.0), 1.0, 8)
    c = assess(c, 570.0, POLICY).calibration
    assert c.unsettled == 0
    c = steps(c, 2.0, 8)
    assert not assess(c, 650.0, POLICY).reprobe and assess(c, 660.0, POLICY).reprobe


def test_corrected_scales_the_hop_prediction_exactly():
    fp = footprint(layer_params=(6_000_000,) * 4, head_params=168_000_000)
    for head in (None, 0.045e-9):
        node = NodeProfile("n", 10**9, 0.07e-9, 0.02e-9, step_overhead_s=1e-4, head_s_per_byte=head)
        for layers in (LayerRange(0, 2), LayerRange(1, 4)):
            assert planner.hop_decode_s(fp, corrected(node, 1.3), layers) == pytest.approx(
                1.3 * planner.hop_decode_s(fp, node, layers))
        assert corrected(node, 1.3).prefill_s_per_byte == node.prefill_s_per_byte
        assert corrected(node, 1.0) is node


def test_observe_keeps_a_window_and_skips_broken_numbers():
    c = observe(Calibration(), [0.01, 0.0, math.nan, 0.01, 0.01], [0.02, 0.01, 0.01, -1.0, 5.0], POLICY)
    assert c.ratios == (2.0,)  # zero, nan, negative and a 500x ratio are not measurements
    c = steps(c, 1.0, 20)
    assert len(c.ratios) == POLICY.window
    with pytest.raises(ValueError, match="pair them"):
        observe(c, [0.01], [], POLICY)
    assert cal.DEFAULT_POLICY.reprobe_at == 0.25  # what the documentation promises for predictions


def test_the_coordinator_corrects_a_node_by_its_steps_and_asks_for_a_new_probe(model_path):
    """The coordinator's measuring room: decode steps that ran twice as long as the probe predicted make
    the node's planned cost twice the probe's, and ask for a new probe between sessions."""
    from swarm import messages as m
    from swarm.coordinator.measuring import Measurer
    from swarm.coordinator.members import Member
    from swarm.coordinator.peers import RouteHop
    from swarm.gguf_file import read_gguf
    from swarm.placement import footprint as footprint_of

    fp = footprint_of(read_gguf(model_path))
    x = Member("n1", "box", "127.0.0.1:1", "127.0.0.1:2", m.Resources(8 << 30, 8 << 30), None)
    measurer = Measurer(fp, fp.n_layer, files=None, members=None, local=None, peers=None)
    probe = m.ComputeProfile(0.07e-9, 0.01e-9, 1e-4)
    measurer._probed["n1"], measurer._to_me["n1"] = m.ProbeResult(probe, cached=True), m.Link(1e-3, 1e8)
    (before,) = measurer.profiles([x])
    hop = RouteHop("n1", x.address, LayerRange(6, 12), False, x.steps)
    predicted = planner.hop_decode_s(fp, before, hop.layers)
    for _ in range(20):
        measurer.observe((hop,), [x], m.StepResult(1, (m.HopTiming(hop.layers, compute_ms=2e3 * predicted),)))
    assert measurer.assess(["n1"]) == "probe"
    (after,) = measurer.profiles([x])
    assert after.decode_s_per_byte == pytest.approx(2 * before.decode_s_per_byte)
    assert planner.hop_decode_s(fp, after, hop.layers) == pytest.approx(2 * predicted)
    assert measurer._refresh == {"n1"}  # probed afresh once the swarm is idle (planning.REPROBE_IDLE_S)


def test_a_reprobe_waits_for_an_idle_swarm_keeps_the_route_and_holds_sessions_only_while_it_runs(monkeypatch):
    """The steps asked for a new probe: it runs once no session has run for REPROBE_IDLE_S (not between
    two requests of a user), new sessions wait only while it runs, and the route stays (then the plan is
    checked in place)."""
    import threading
    import time

    from swarm.coordinator import planning

    monkeypatch.setattr(planning, "REPROBE_IDLE_S", 0.3)
    busy = [True]
    probes, replans = [], []

    class Members:
        def plannable(self):
            return ["n1"]

    class Measurer:
        def measure(self, members, say, refresh=False):
            start = time.monotonic()
            time.sleep(0.6)
            probes.append((start, time.monotonic(), refresh, busy[0]))

    placement = planning.Placement(Members(), Measurer(), None, None, None, busy=lambda: busy[0],
                                   on_route=lambda: None)
    route = ("the route",)
    placement._dirty, placement._route = False, route
    placement._replan_in_place = lambda: replans.append(time.monotonic())
    placement.start()
    try:
        placement.reprobe()
        time.sleep(1.5)
        assert probes == [], "probed while a session ran"
        busy[0] = False
        placement.poke()  # the session ended
        ended = time.monotonic()
        deadline = time.monotonic() + 5
        while not probes and not placement._probing:
            assert time.monotonic() < deadline, "never probed once idle"
            time.sleep(0.01)
        started = []
        t = threading.Thread(target=lambda: started.append(
            placement.start_session(lambda r: (time.monotonic(), r), 5.0, lambda: True)))
        t.start()
        t.join(10)
        assert len(probes) == 1 and probes[0][2] is True  # the nodes that asked are measured again
        assert probes[0][0] - ended >= 0.3 - 0.05  # not before the swarm was idle that long
        (at, got), = started
        assert got is route and at >= probes[0][1]  # the session waited for the probe, on the same route
        assert len(replans) == 1 and replans[0] >= probes[0][1]  # then the plan is checked in place
        assert placement.route() is route
    finally:
        placement.stop()
