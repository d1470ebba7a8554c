"""Surviving node failures with real processes on 127.0.0.1 and the real default model.

Each test starts a coordinator that hosts no layers (so it can take any range over) and three nodes
pinned to 0:6, 6:12 and 12:18, generates 128 greedy tokens, and breaks a node at a random token
position while the tokens stream: kill -9, SIGSTOP, SIGTERM (a graceful leave), two failures in one
generation. The completed text must be exactly what the uninterrupted run gives (plain llama-cpp-python),
and `swarm status` must record how each failure was detected and which path carried the sessions over.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import PROMPTS
from procs import Proc, Swarm, free_port
from swarm.client import SwarmClient

N = 128
KEY = "failover-key"
PINS = [["--layers", "0:6"], ["--layers", "6:12"], ["--layers", "12:18"]]
LAYERS = ["0:6", "6:12", "12:18"]


def _swarm(tmp, model_path, nodes=PINS, coordinator_args=(), ctx=512):
    swarm = Swarm(tmp, model_path, list(coordinator_args), [list(n) for n in nodes], key=KEY, ctx=ctx)
    try:
        swarm.wait_ready()
    except BaseException:
        swarm.close()
        raise
    return swarm


@pytest.fixture
def swarm(tmp_path, model_path, monkeypatch):
    """The test's own swarm: a coordinator hosting nothing and three pinned nodes (broken by the test).

    KV states travel in 64 KB pieces here, so checkpoints and handovers cross the wire in several."""
    monkeypatch.setenv("SWARM_KV_PIECE_BYTES", str(64 << 10))
    s = _swarm(tmp_path, model_path)
    yield s
    for p in s.procs:
        if p.p.poll() is None:
            p.p.send_signal(signal.SIGCONT)  # a stopped node must be able to take its SIGTERM
    s.close()


def _span(d: dict) -> str:
    return f"{d['start']}:{d['end']}"


def _generate_breaking(swarm, prompt, breaks, n=N, **options):
    """Stream a generation; at each (token count, action) call action(). Returns (tokens, break positions)."""
    gen = swarm.client.generate(prompt, max_tokens=n, **options)
    todo = sorted(breaks, key=lambda b: b[0])
    print("breaking after", [b[0] for b in todo], "tokens")  # shown when the test fails: reproduce with it
    at = []
    for _ in gen:
        while todo and len(gen.result.tokens) >= todo[0][0]:
            at.append(len(gen.result.tokens))
            todo.pop(0)[1]()
    assert not todo, f"the generation ended after {len(gen.result.tokens)} tokens, before every break"
    return gen.result.tokens, at


def _kill(swarm, layers: str, sig=signal.SIGKILL):
    proc = swarm.procs[1 + LAYERS.index(layers)]
    return lambda: proc.p.send_signal(sig)


def _recoveries(swarm) -> list[dict]:
    return swarm.client.status()["recoveries"]


@pytest.mark.parametrize("layers", LAYERS, ids=["first", "middle", "last"])
def test_kill_9_at_a_random_token_gives_the_uninterrupted_text(swarm, reference, layers):
    prompt = PROMPTS[LAYERS.index(layers)]
    _, expected, _ = reference.run(prompt, N)
    position = random.randrange(4, len(expected) - 8)
    print(f"kill -9 of the node holding {layers} after {position} tokens")
    tokens, _ = _generate_breaking(swarm, prompt, [(position, _kill(swarm, layers))])
    assert tokens == expected
    (r,) = _recoveries(swarm)
    assert _span(r["layers"]) == layers and r["detection"] == "call failed"
    assert r["path"] == "replay" and r["sessions"] == 1 and r["successor"] == "coord"
    # the swarm goes on serving new sessions on the repaired route, and they are exact too
    again = swarm.client.complete(PROMPTS[0], max_tokens=16)
    assert again.tokens == reference.run(PROMPTS[0], N)[1][:16]


def test_a_rebuild_from_a_long_chain_of_kv_deltas(tmp_path, model_path, reference, monkeypatch):
    """A checkpoint after almost every step: each is a delta on the one before (new cells only), chains
    are put together every 32 links, and a kill -9 is rebuilt from such a chain with the text unchanged."""
    monkeypatch.setenv("SWARM_REPLAY_BUDGET_S", "0.001")
    prompt = PROMPTS[1]
    _, expected, _ = reference.run(prompt, N)
    swarm = _swarm(tmp_path, model_path)
    try:
        tokens, _ = _generate_breaking(swarm, prompt, [(96, _kill(swarm, "6:12"))])
        assert tokens == expected
        (r,) = _recoveries(swarm)
        assert r["path"] == "replay" and r["replayed_positions"] <= 8, r
        c = {k: int(v) for k, v in swarm.client.status()["checkpoints"].items()}
        print(c)
        assert c["deltas"] > 150 and c["full"] >= 3
        assert c["delta_bytes"] / c["deltas"] < c["full_bytes"] / c["full"] / 3
    finally:
        swarm.close()


@pytest.mark.parametrize("layers", ["0:6", "6:12"], ids=["first", "middle"])
def test_kill_9_past_the_sliding_window_gives_the_uninterrupted_text(tmp_path, model_path, reference, monkeypatch,
                                                                     layers):
    """A session longer than Gemma 3's 512-position window: its checkpoints hold only the window's cells, and
    the successor that imports one must compute exactly what the lost node would have (on AVX2 CPUs it did
    not, until imports put each cell back where it was)."""
    monkeypatch.setenv("SWARM_REPLAY_BUDGET_S", "0.01")  # checkpoints every few steps: the last one is past 512
    prompt, n = PROMPTS[0], 660
    _, expected, _ = reference.run(prompt, n, n_ctx=1024)
    assert len(expected) == n  # no end of text before the window is passed
    swarm = _swarm(tmp_path, model_path, ctx=1024)
    try:
        position = random.randrange(610, 640)
        print(f"kill -9 of the node holding {layers} after {position} tokens")
        tokens, _ = _generate_breaking(swarm, prompt, [(position, _kill(swarm, layers))], n=n)
        assert tokens == expected
        (r,) = _recoveries(swarm)
        assert _span(r["layers"]) == layers and r["path"] == "replay" and r["replayed_positions"] < 100, r
    finally:
        swarm.close()


def test_a_hung_node_is_declared_dead_within_3_s_and_recovered(swarm, reference):
    prompt = PROMPTS[1]
    _, expected, _ = reference.run(prompt, N)
    stopped = []

    def stop():
        stopped.append(time.time())
        swarm.procs[2].p.send_signal(signal.SIGSTOP)

    tokens, _ = _generate_breaking(swarm, prompt, [(random.randrange(4, 100), stop)])
    assert tokens == expected
    (r,) = _recoveries(swarm)
    assert r["detection"].startswith("missed heartbeats") and r["path"] == "replay"
    assert r["at_unix"] - stopped[0] <= 3.0, r


def test_sigterm_hands_the_sessions_over_without_recomputing(swarm, reference):
    prompts = PROMPTS[:2]
    expected = [reference.run(p, N)[1] for p in prompts]
    results = {}
    other = threading.Thread(target=lambda: results.update(
        other=SwarmClient(swarm.address, key=KEY).complete(prompts[1], max_tokens=N).tokens))
    other.start()  # a second session running through the same nodes
    tokens, _ = _generate_breaking(swarm, prompts[0], [(random.randrange(4, 80), _kill(swarm, "6:12", signal.SIGTERM))])
    other.join(120)
    assert tokens == expected[0] and results["other"] == expected[1]
    (r,) = _recoveries(swarm)
    assert r["detection"] == "left" and r["path"] == "migrate" and r["replayed_positions"] == 0
    assert 1 <= r["sessions"] <= 2
    assert swarm.procs[2].p.wait(30) == 0  # the node finished leaving and exited by itself
    assert "handed over" in swarm.procs[2].text()


def test_two_failures_in_one_generation(swarm, reference):
    prompt = PROMPTS[2]
    _, expected, _ = reference.run(prompt, N)
    first = random.randrange(4, 50)
    tokens, _ = _generate_breaking(swarm, prompt, [
        (first, _kill(swarm, "6:12")), (first + random.randrange(8, 60), _kill(swarm, "12:18"))])
    assert tokens == expected
    records = _recoveries(swarm)
    assert sorted(_span(r["layers"]) for r in records) == ["12:18", "6:12"]
    assert all(r["path"] == "replay" for r in records)
    nodes = {n["name"]: n for n in swarm.client.status()["nodes"]}
    assert sorted(_span(e) for e in nodes["coord"]["extra_layers"]) == ["12:18", "6:12"]


def test_two_neighbours_killed_at_once(swarm, reference):
    prompt = PROMPTS[0]
    _, expected, _ = reference.run(prompt, N)
    def both():
        swarm.procs[1].p.kill()
        swarm.procs[2].p.kill()

    tokens, _ = _generate_breaking(swarm, prompt, [(random.randrange(20, 100), both)])
    assert tokens == expected
    records = _recoveries(swarm)
    assert sorted(_span(r["layers"]) for r in records) == ["0:6", "6:12"]
    assert {r["path"] for r in records} <= {"replay", "recompute"}


def test_seeded_sampling_continues_as_if_nothing_happened(swarm):
    options = dict(temperature=0.8, top_k=40, top_p=0.95, seed=1234)
    calm = swarm.client.complete(PROMPTS[0], max_tokens=64, **options).tokens
    tokens, _ = _generate_breaking(swarm, PROMPTS[0], [(random.randrange(4, 50), _kill(swarm, "12:18"))],
                                   n=64, **options)
    assert tokens == calm


def test_a_node_joining_mid_generation_does_not_disturb_it(swarm, tmp_path, reference):
    prompt = PROMPTS[1]
    _, expected, _ = reference.run(prompt, N)
    def join():
        swarm.procs.append(Proc(["--host", "127.0.0.1", "--key", KEY, "--name", "late", "--coordinator",
                                 swarm.address, "--mdns-interface", "off"], tmp_path / "late.log",
                                {"SWARM_CACHE_DIR": str(tmp_path / "late-cache")}))

    tokens, _ = _generate_breaking(swarm, prompt, [(8, join)])
    assert tokens == expected
    assert not _recoveries(swarm)
    deadline = time.monotonic() + 60
    while "late" not in {n["name"] for n in swarm.client.status()["nodes"]}:
        assert time.monotonic() < deadline, swarm.procs[-1].text()
        time.sleep(0.5)


def test_leave_after_and_status_show_the_recovery(tmp_path, model_path, reference):
    prompt = PROMPTS[2]
    _, expected, _ = reference.run(prompt, N)
    swarm = Swarm(tmp_path, model_path, [], [PINS[0], PINS[1] + ["--leave-after", "25s"], PINS[2]], key=KEY)
    try:
        swarm.wait_ready()
        # Generate until the node's time is up (it leaves during a generation or between two).
        deadline = time.monotonic() + 120
        while swarm.procs[2].p.poll() is None:
            assert time.monotonic() < deadline, swarm.procs[2].text()
            assert swarm.client.complete(prompt, max_tokens=N).tokens == expected
        assert swarm.procs[2].p.wait(60) == 0
        assert "--leave-after 25s is up" in swarm.procs[2].text()
        assert swarm.client.complete(prompt, max_tokens=N).tokens == expected
        done = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--coordinator", swarm.address, "--key",
                               KEY], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "recovery" in done.stdout and "node node1" in done.stdout and " left; path " in done.stdout, done.stdout
        as_json = subprocess.run([sys.executable, "-m", "swarm.cli", "status", "--json", "--coordinator",
                                  swarm.address, "--key", KEY], capture_output=True, text=True, timeout=60)
        (r,) = json.loads(as_json.stdout)["recoveries"]
        assert r["node"] == "node1" and r["detection"] == "left" and r["path"] in ("migrate", "none")
    finally:
        swarm.close()


def test_a_cut_link_between_network_namespaces(tmp_path, model_path, reference):
    """Coordinator, three nodes and a client each on a host of its own; the middle node's cable is pulled."""
    from netlab import NetLab

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("this test makes network namespaces: run the suite as root with iproute2 installed (CI does)")

    prompt = PROMPTS[0]
    _, expected, _ = reference.run(prompt, N)
    lab = NetLab(5)
    coordinator = f"{lab.address(0)}:7700"
    procs = []
    try:
        procs.append(Proc(["--model", str(model_path), "--host", lab.address(0), "--port", "7700", "--key", KEY,
                           "--ctx", "512", "--name", "coord", "--mdns-interface", "off"], tmp_path / "coordinator.log",
                          prefix=lab.prefix(0)))
        for i, pin in enumerate(PINS):
            procs.append(Proc(["--host", lab.address(1 + i), "--key", KEY, "--name", f"node{i}", "--coordinator",
                               coordinator, "--mdns-interface", "off", *pin], tmp_path / f"node{i}.log",
                              {"SWARM_CACHE_DIR": str(tmp_path / f"node{i}-cache")}, prefix=lab.prefix(1 + i)))
        client = subprocess.Popen([*lab.prefix(4), sys.executable, str(Path(__file__).with_name("netns_client.py")),
                                   coordinator, KEY, prompt, str(N), "4"], stdout=subprocess.PIPE, text=True)
        cut_at, result = random.randrange(4, 100), None
        timer = threading.Timer(400, client.kill)  # bounded: a hang fails the test instead of the suite
        timer.start()
        for line in client.stdout:
            event = json.loads(line)
            if event.get("n") == cut_at:
                lab.cut(2)
                cut_time = time.time()
            result = event
        timer.cancel()
        assert client.wait(30) == 0, "\n".join(p.text()[-2000:] for p in procs)
        assert result["tokens"] == expected
        (r,) = result["status"]["recoveries"]
        assert r["node"] == "node1" and r["detection"].startswith("missed heartbeats"), r
        assert r["path"] == "replay" and r["successor"] == "coord"
        assert r["at_unix"] - cut_time <= 3.0
    finally:
        for p in procs:
            p.stop()
        lab.close()


def test_a_node_restarted_under_the_same_pin_takes_over_from_its_hung_old_self(swarm, tmp_path, reference):
    # Whether the old one is found dead by missed heartbeats or by the newcomer's join (which pings a rival
    # pin's holder), the newcomer must end up with the pin rather than be refused.
    swarm.procs[2].p.send_signal(signal.SIGSTOP)
    swarm.procs.append(Proc(["--host", "127.0.0.1", "--key", KEY, "--name", "again", "--coordinator", swarm.address,
                             "--mdns-interface", "off", "--layers", "6:12"], tmp_path / "again.log",
                            {"SWARM_CACHE_DIR": str(tmp_path / "again-cache")}))
    deadline = time.monotonic() + 120
    while True:
        assert swarm.procs[-1].p.poll() is None, swarm.procs[-1].text()
        held = {n["name"]: n for n in swarm.client.status()["nodes"] if n["has_layers"]}
        if "again" in held and swarm.client.status()["state"] == "ready":
            break
        assert time.monotonic() < deadline, swarm.procs[-1].text()
        time.sleep(0.3)
    assert _span(held["again"]["layers"]) == "6:12" and "node1" not in held
    assert swarm.client.complete(PROMPTS[0], max_tokens=32).tokens == reference.run(PROMPTS[0], N)[1][:32]


def test_a_node_restarted_at_its_old_address_serves_again(tmp_path, model_path, reference):
    """The hop before it still holds a step connection to the old process: that one fails, a new one works."""
    port = free_port()
    swarm = _swarm(tmp_path, model_path, nodes=[PINS[0], PINS[1], PINS[2] + ["--port", str(port)]])
    try:
        expected = reference.run(PROMPTS[1], N)[1][:32]
        assert swarm.client.complete(PROMPTS[1], max_tokens=32).tokens == expected  # connections now pooled
        old = swarm.procs[3]
        old.p.kill()
        old.p.wait(10)
        again = Proc(old.args, tmp_path / "node2-again.log", {"SWARM_CACHE_DIR": str(tmp_path / "node2-cache")})
        swarm.procs.append(again)
        deadline = time.monotonic() + 120
        while "joined swarm" not in again.text() or swarm.client.status()["state"] != "ready":
            assert again.p.poll() is None and time.monotonic() < deadline, again.text()
            time.sleep(0.3)
        (last,) = [n for n in swarm.client.status()["nodes"] if n["has_layers"] and _span(n["layers"]) == "12:18"]
        assert last["step_address"] == f"127.0.0.1:{port + 1}"
        assert swarm.client.complete(PROMPTS[1], max_tokens=32).tokens == expected
    finally:
        swarm.close()


def test_recovery_calls_refuse_bad_input_and_the_swarm_keeps_serving(swarm, reference):
    import grpc

    from swarm import wire
    from swarm._proto import swarm_pb2 as pb
    from swarm._proto import swarm_pb2_grpc as pbg

    node = next(n for n in swarm.client.status()["nodes"] if n["name"] == "node1")  # holds 6:12
    layers = pb.LayerSpan(start=6, end=12)
    with wire.channel(node["address"], KEY) as ch, wire.channel(swarm.address, KEY) as cch:
        stub, coordinator = pbg.NodeStub(ch), pbg.CoordinatorStub(cch)

        def refused(call, request, words):
            with pytest.raises(grpc.RpcError) as e:
                call(request, timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
            assert words in e.value.details(), e.value.details()

        refused(stub.Rewind, pb.RewindRequest(session_id="nope", layers=layers, length=0), "unknown session")
        stub.OpenSession(pb.OpenSessionRequest(session_id="s1", layers=layers), timeout=30)
        refused(stub.Rewind, pb.RewindRequest(session_id="s1", layers=layers, length=5), "cannot roll")
        refused(stub.ImportKV, iter([pb.ImportKVRequest(session_id="s1", layers=layers, kv=b"garbage")]),
                "not a swarm KV")
        refused(stub.ImportKV, iter([pb.ImportKVRequest(session_id="s1", layers=layers, kept=[
            pb.KeptStep(start=0, tokens=[1], hidden=b"\0" * 12)])]), "hidden state per position")
        refused(stub.ImportKV, iter([]), "at least one message")
        refused(stub.Resend, pb.ResendRequest(session_id="s1", layers=layers, from_position=0, to_position=4,
                                              to=pb.Hop(address=swarm.address, layers=pb.LayerSpan(start=12, end=18))),
                "recomputed")
        refused(stub.Handoff, pb.HandoffRequest(session_id="nope", layers=layers, to=pb.Hop(
            address=swarm.address, layers=layers)), "unknown session")
        refused(stub.OpenSession, pb.OpenSessionRequest(session_id="s2", layers=layers, history=[1] * 600),
                "history is at most")
        stub.Rewind(pb.RewindRequest(session_id="s1", layers=layers, length=0, epoch=3), timeout=30)
        hidden = np.zeros((1, 640), dtype=np.float32).tobytes()
        refused(stub.Forward, pb.ForwardRequest(session_id="s1", start=0, n_positions=1, tokens=[1], hidden=hidden,
                                                layers=layers, replay=True, epoch=2), "stale step")
        stub.CloseSession(pb.CloseSessionRequest(session_id="s1"), timeout=30)
        coordinator.StoreCheckpoint(iter([pb.Checkpoint(session_id="nobody", layers=layers, positions=3, kv=b"x")]),
                                    timeout=30)  # a session that ended: ignored
    with wire.channel(swarm.address, "wrong-key") as bad:  # the streamed calls check the key too
        with pytest.raises(grpc.RpcError) as e:
            pbg.CoordinatorStub(bad).StoreCheckpoint(iter([pb.Checkpoint(session_id="x")]), timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert swarm.client.complete(PROMPTS[0], max_tokens=32).tokens == reference.run(PROMPTS[0], N)[1][:32]
