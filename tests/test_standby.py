"""Warm standbys with real processes on 127.0.0.1 and the real default model.

A node with memory to spare holds a loaded replica of a range it does not serve and holds that range's
checkpoints as they are taken (deltas, imported at the takeover); when the range's node is killed, the
standby takes over with no shard load and replays only the steps since the last checkpoint. The text must be exactly what plain
llama-cpp-python gives, and the recovery record must say `standby`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import signal
import time

import pytest

from conftest import PROMPTS
from swarm.cli.status import cmd_status
from swarm.gguf_file import read_gguf
from swarm.layers import LayerRange
from swarm.placement import footprint
from test_failover import LAYERS, PINS, _generate_breaking, _kill, _recoveries, _span, _swarm

N = 128


def _standbys(swarm) -> dict[str, dict]:
    """The standbys `swarm status` shows, by the range they guard."""
    return {_span(b["layers"]): b for b in swarm.client.status().get("standbys", [])}


def _wait_standby(swarm, layers: str, node: str | None = None, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = _standbys(swarm).get(layers)
        if b is not None and b["state"] == "ready" and (node is None or b["node"] == node):
            return b
        time.sleep(0.2)
    raise AssertionError(f"no standby of {layers} on {node or 'any node'} after {timeout} s: {_standbys(swarm)}")


@pytest.fixture
def swarm(tmp_path, model_path, monkeypatch):
    """A coordinator hosting nothing (it has the memory to stand by) and three pinned nodes."""
    monkeypatch.setenv("SWARM_KV_PIECE_BYTES", str(64 << 10))
    s = _swarm(tmp_path, model_path, standbys=True)
    yield s
    s.close()


def test_status_shows_who_stands_by_for_whom(swarm):
    for layers in LAYERS:
        b = _wait_standby(swarm, layers, "coord")
        assert b["guards"] == f"node{LAYERS.index(layers)}" and int(b["bytes"]) > 0, b
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cmd_status(argparse.Namespace(json=False, coordinator=swarm.address, key=swarm.key, swarm=None,
                                      mdns_interface="off"))
    assert "standby: coord holds layers 12:18 for node2 (ready" in out.getvalue(), out.getvalue()


def test_kill_9_of_the_last_range_is_taken_over_by_its_standby_with_no_load(swarm, reference):
    prompt = PROMPTS[2]
    _, expected, _ = reference.run(prompt, N)
    _wait_standby(swarm, "12:18", "coord")
    position = random.randrange(40, len(expected) - 8)  # past the prompt's checkpoint and a few more
    print(f"kill -9 of the node holding 12:18 after {position} tokens")
    received = []
    kill = _kill(swarm, "12:18")

    def break_() -> None:
        received.append(int(_standbys(swarm)["12:18"]["checkpoints"]))
        kill()

    tokens, _ = _generate_breaking(swarm, prompt, [(position, break_)])
    assert tokens == expected
    assert received[0] >= 1  # the standby had taken in the range's checkpoints before the loss
    (r,) = _recoveries(swarm)
    print(r)
    assert _span(r["layers"]) == "12:18" and r["path"] == "standby" and r["successor"] == "coord", r
    assert "standby ready (no load)" in r["detail"], r
    log = swarm.coordinator.text()
    assert "takes layers 12:18 over from node2: it stood by (no load)" in log
    takeover = log.split("takes layers 12:18 over")[1].split("carried over at position")[0]
    assert "serving layers" not in takeover  # no shard was loaded between the takeover and the resumed step
    # nor a whole state sent: it imported the checkpoint it held (the deltas it was sent as they came)
    assert "the standby of layers 12:18 imported the" in takeover and "positions it held" in takeover
    # the swarm goes on serving new sessions on the repaired route, and they are exact too
    again = swarm.client.complete(PROMPTS[0], max_tokens=16)
    assert again.tokens == reference.run(PROMPTS[0], N)[1][:16]


def test_kill_9_past_the_sliding_window_with_a_standby(tmp_path, model_path, reference, monkeypatch):
    """Past Gemma 3's 512-position window the standby imports checkpoints that hold only the window's cells;
    each cell must go back where it was, or the text changes on AVX2 machines."""
    monkeypatch.setenv("SWARM_REPLAY_BUDGET_S", "0.01")  # checkpoints every few steps: the last one is past 512
    monkeypatch.setenv("SWARM_KV_PIECE_BYTES", str(64 << 10))
    prompt, n = PROMPTS[0], 660
    _, expected, _ = reference.run(prompt, n, n_ctx=1024)
    assert len(expected) == n
    swarm = _swarm(tmp_path, model_path, ctx=1024, standbys=True)
    try:
        _wait_standby(swarm, "12:18", "coord")
        position = random.randrange(610, 640)
        print(f"kill -9 of the node holding 12:18 after {position} tokens")
        tokens, _ = _generate_breaking(swarm, prompt, [(position, _kill(swarm, "12:18"))], n=n)
        assert tokens == expected
        (r,) = _recoveries(swarm)
        assert _span(r["layers"]) == "12:18" and r["path"] == "standby" and r["replayed_positions"] < 100, r
    finally:
        swarm.close()


def test_a_standby_lost_before_the_node_it_guards(tmp_path, model_path, reference, monkeypatch):
    """Two spare nodes with room for one replica of the largest range each: the first stands by for that range,
    the second for the next largest. The first is killed mid-generation: the text goes on unchanged, and the
    second gives its standby back to stand by for the largest range (the costlier loss) while the session
    runs. Then the node holding that range is killed and the second spare takes over with no load."""
    monkeypatch.setenv("SWARM_KV_PIECE_BYTES", str(64 << 10))
    fp = footprint(read_gguf(model_path))
    need = {r: fp.shard_bytes(LayerRange.parse(r), 1024, 4) for r in LAYERS}  # the coordinator's settings here
    big = max(LAYERS, key=lambda r: need[r])  # (the vocabulary's ranges: first and last are close in size)
    print("ranges by size:", sorted(need.items(), key=lambda kv: -kv[1]))
    nodes = [pin + ["--max-memory", str(need[pin[1]] + (8 << 20))] for pin in PINS]  # no room to spare
    nodes += [["--name", "spare-a", "--max-memory", str(need[big] + (24 << 20))],
              ["--name", "spare-b", "--max-memory", str(need[big] + (16 << 20))]]
    swarm = _swarm(tmp_path, model_path, nodes=nodes, coordinator_args=["--max-memory", str(8 << 20)], ctx=1024,
                   standbys=True)
    try:
        _wait_standby(swarm, big, "spare-a")
        assert any(b["node"] == "spare-b" for b in _standbys(swarm).values()), _standbys(swarm)
        prompt, n = PROMPTS[1], 400
        _, expected, _ = reference.run(prompt, n, n_ctx=1024)
        seen = {}

        def lose_the_standby() -> None:
            swarm.procs[4].p.send_signal(signal.SIGKILL)
            seen["standby"] = _wait_standby(swarm, big, "spare-b", timeout=60)
            seen["sessions"] = len(swarm.client.status()["sessions"])

        tokens, _ = _generate_breaking(swarm, prompt, [(20, lose_the_standby)], n=n)
        assert tokens == expected
        assert seen["sessions"] == 1  # the new standby was chosen while the session ran
        assert _recoveries(swarm) == []  # a standby serves no layers: nothing to recover
        _wait_standby(swarm, big, "spare-b")  # (again after the re-plan that followed the loss)
        prompt = PROMPTS[2]
        _, expected, _ = reference.run(prompt, N, n_ctx=1024)
        tokens, _ = _generate_breaking(swarm, prompt, [(60, _kill(swarm, big))])
        assert tokens == expected
        (r,) = _recoveries(swarm)
        assert _span(r["layers"]) == big and r["path"] == "standby" and r["successor"] == "spare-b", r
    finally:
        swarm.close()
