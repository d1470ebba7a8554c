"""Notebooks behind NAT in a real swarm: network namespaces (tests/netbed.py), real `swarm join` processes
and the real Gemma 3 270M model.

A home host runs the coordinator (holding no layers, so it can take any range over), a second home host
a node pinned to 0:6, and two notebooks, each behind a NAT router of its own (outbound masqueraded,
nothing new inbound), are pinned to 6:9 and 9:18: two outbound-only nodes next to each other, the first
in the middle of the route. They join with
nothing but the coordinator's address and the key; the coordinator must find out by itself that it
cannot reach them and serve them through its relay. Greedy text through the swarm must be exactly plain
llama-cpp-python's on the unsplit model, and stay so when one notebook is killed with -9 in the middle of
a generation and when the other leaves (SIGTERM) in the middle of the next one; then a notebook that joins
again has its cable pulled mid-generation, and one started with --leave-after leaves by itself. The client
runs on the coordinator's home host (tests/netbed_client.py): nothing in the namespaces is reachable from
here.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import netbed
from conftest import PROMPTS
from procs import Proc

N = 96
KEY = "nat-test-key-of-the-notebooks"
PORT = 7700
CLIENT = Path(__file__).with_name("netbed_client.py")


class Bed:
    """The bed, the swarm's processes (coordinator, home node, notebook0, notebook1) and a client on h0."""

    def __init__(self, tmp: Path, model: Path):
        self.bed = netbed.NetBed(home=2, notebooks=2)
        h0, h1 = self.bed.home
        self.address = f"{h0.address}:{PORT}"
        self.procs: list[Proc] = []
        self.procs.append(Proc(["--model", str(model), "--host", h0.address, "--port", str(PORT), "--key", KEY,
                                "--ctx", "512", "--name", "coord", "--mdns-interface", "off", "--no-standbys",
                                "--http-port", "0"], tmp / "coordinator.log", prefix=h0.prefix))
        nodes = [("home1", h1, ["--host", h1.address, "--layers", "0:6"]),
                 ("notebook0", self.bed.notebooks[0], ["--layers", "6:9"]),
                 ("notebook1", self.bed.notebooks[1], ["--layers", "9:18"])]
        self.tmp = tmp
        for name, host, extra in nodes:  # the notebooks: only where the coordinator is and the key
            self.start(name, host, extra)
        self.client = self.bed.spawn(h0, [sys.executable, str(CLIENT)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def start(self, name: str, host, extra: list[str]) -> Proc:
        """A node joining with only the coordinator's address and the key (its shard cache kept per host)."""
        self.procs.append(Proc(["--key", KEY, "--name", name, "--coordinator", self.address, "--mdns-interface", "off",
                                *extra], self.tmp / f"{name}.log",
                               {"SWARM_CACHE_DIR": str(self.tmp / f"{host.name}-cache")}, prefix=host.prefix))
        return self.procs[-1]

    def wait_on_route(self, name: str) -> dict:
        """Wait until node `name` serves its range on the swarm's route; its status entry."""
        deadline = time.monotonic() + 300
        while True:
            nodes = _nodes(self.ask("wait", nodes=3)["status"])
            if name in nodes and nodes[name]["has_layers"] and nodes[name]["state"] in ("ready", "idle"):
                return nodes[name]
            assert time.monotonic() < deadline, f"{name} never joined the route\n" + self.logs()
            time.sleep(0.5)

    def proc(self, name: str) -> Proc:
        return next(p for p in self.procs if p.log.name == f"{name}.log")

    def ask(self, op: str, on_event=None, timeout: float = 300, **cmd) -> dict:
        """One command to the client; `on_event(event)` sees each progress line. Bounded by `timeout`: a hang
        kills the client and fails the test instead of the suite."""
        self.client.stdin.write(json.dumps({"op": op, "address": self.address, "key": KEY, **cmd}) + "\n")
        self.client.stdin.flush()
        timer = threading.Timer(timeout, self.client.kill)
        timer.start()
        try:
            for line in self.client.stdout:
                event = json.loads(line)
                if "n" in event and on_event is not None:
                    on_event(event)
                elif "n" not in event:
                    assert "error" not in event, event["error"] + "\n" + self.logs()
                    return event
            raise AssertionError(f"the client ended (exit {self.client.poll()})\n" + self.logs())
        finally:
            timer.cancel()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log.name}\n{p.text()[-2500:]}" for p in self.procs)

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        self.bed.close()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, model_path):
    netbed.require()  # fails (not skips) with what is missing: root, iproute2, nftables
    bed = Bed(tmp_path_factory.mktemp("nat"), model_path)
    try:
        bed.ask("wait", nodes=4)
        yield bed
    finally:
        bed.close()


def _nodes(status: dict) -> dict[str, dict]:
    return {n["name"]: n for n in status["nodes"]}


def _break_at(swarm: Bed, prompt: str, position: int, proc: Proc, sig, n: int = N) -> list[int]:
    """Generate `n` greedy tokens, sending `sig` to `proc` once `position` tokens have come."""
    sent = []

    def on_event(event):
        if not sent and event["n"] >= position:
            proc.p.send_signal(sig)
            sent.append(event["n"])

    result = swarm.ask("generate", on_event, prompt=prompt, n=n)
    assert sent, f"the generation ended after {len(result['tokens'])} tokens, before the signal"
    return result["tokens"]


def test_two_notebooks_behind_nat_are_found_out_and_relayed(swarm, reference):
    nodes = _nodes(swarm.ask("status")["status"])
    assert nodes["notebook0"]["outbound_only"] and nodes["notebook1"]["outbound_only"], nodes
    assert not nodes["home1"]["outbound_only"]
    assert not nodes["coord"]["has_layers"]
    assert {name: (n["layers"]["start"], n["layers"]["end"]) for name, n in nodes.items() if n["has_layers"]} == {
        "home1": (0, 6), "notebook0": (6, 9), "notebook1": (9, 18)}
    # Nobody told them: the coordinator tried each notebook's port, got no answer, and relays to it
    # at its own address (the relay's ports), not at the router's.
    assert swarm.procs[0].text().count("(it did not answer)") == 2, swarm.procs[0].text()
    home = swarm.bed.home[0].address
    for name in ("notebook0", "notebook1"):
        assert nodes[name]["address"].startswith(home + ":") and nodes[name]["state"] == "ready", nodes[name]
        assert "peers reach it through the relay" in swarm.proc(name).text()
    # The step from notebook0 to notebook1 goes through the relay too: two relayed hops in a row.
    for prompt in PROMPTS[:2]:
        _, expected, _ = reference.run(prompt, N)
        assert swarm.ask("generate", prompt=prompt, n=N)["tokens"] == expected


def test_kill_9_of_a_notebook_mid_generation_keeps_the_text(swarm, reference):
    prompt = PROMPTS[2]
    _, expected, _ = reference.run(prompt, N)
    position = random.randrange(4, len(expected) - 8)
    print(f"kill -9 of notebook0 (6:9) after {position} tokens")
    assert _break_at(swarm, prompt, position, swarm.proc("notebook0"), signal.SIGKILL) == expected
    status = swarm.ask("status")["status"]
    (r,) = status["recoveries"]
    assert r["node"] == "notebook0" and r["detection"] == "call failed", r
    assert (r["layers"]["start"], r["layers"]["end"]) == (6, 9) and r["sessions"] == 1, r
    assert "notebook0" not in _nodes(status)
    # The relay saw its connections go: the gRPC channel and the step link at least.
    assert int(swarm.procs[0].text().split("relay: notebook0 disconnected (")[1].split()[0]) >= 2


def test_sigterm_of_a_notebook_mid_generation_keeps_the_text(swarm, reference):
    # A leave is not instant: the coordinator loads 9:18 first (about a second) and the session moves at
    # the step after that. Signal early in a long generation, so that it is still running by then.
    prompt, n = PROMPTS[0], 3 * N
    _, expected, _ = reference.run(prompt, n)
    assert len(expected) == n, "the reference stopped early; this prompt cannot hold a leave"
    position = random.randrange(4, 32)
    print(f"SIGTERM of notebook1 (9:18) after {position} tokens")
    notebook = swarm.proc("notebook1")
    assert _break_at(swarm, prompt, position, notebook, signal.SIGTERM, n) == expected
    records = swarm.ask("status")["status"]["recoveries"]
    assert [r["node"] for r in records] == ["notebook0", "notebook1"], records
    r = records[1]
    assert r["detection"] == "left" and r["path"] == "migrate" and r["replayed_positions"] == 0, r
    assert notebook.p.wait(30) == 0  # it finished leaving and exited by itself
    assert "handed over" in notebook.text()
    # ...and the swarm goes on serving, exactly, without any notebook.
    _, expected, _ = reference.run(PROMPTS[1], N)
    assert swarm.ask("generate", prompt=PROMPTS[1], n=N)["tokens"] == expected


def test_a_cut_link_of_a_notebook_mid_generation_keeps_the_text(swarm, reference):
    # A notebook joins again (its range was taken over by the coordinator), then its cable is pulled mid-
    # generation: its relayed connections go silent rather than closed, and missed heartbeats find it out.
    notebook_host = swarm.bed.notebooks[0]
    notebook = swarm.start("notebook2", notebook_host, ["--layers", "6:9"])
    assert swarm.wait_on_route("notebook2")["outbound_only"]
    prompt = PROMPTS[2]
    _, expected, _ = reference.run(prompt, N)
    position = random.randrange(4, len(expected) - 8)
    print(f"the cable of notebook2 (6:9) pulled after {position} tokens")
    cut = []

    def on_event(event):
        if not cut and event["n"] >= position:
            swarm.bed.cut(notebook_host)
            cut.append(time.time())

    assert swarm.ask("generate", on_event, prompt=prompt, n=N)["tokens"] == expected
    assert cut, "the generation ended before the cable was pulled"
    r = swarm.ask("status")["status"]["recoveries"][-1]
    assert r["node"] == "notebook2" and (r["layers"]["start"], r["layers"]["end"]) == (6, 9), r
    assert r["detection"].startswith("missed heartbeats") or r["detection"] == "call failed", r
    assert r["path"] == "replay" and r["sessions"] == 1, r
    notebook.stop()
    swarm.bed.cut(notebook_host, up=True)


def test_leave_after_of_a_notebook_keeps_the_text(swarm, reference):
    # A notebook that knows when its session ends (--leave-after) leaves by itself during or between
    # generations; every text stays exact, and the record says it left.
    notebook = swarm.start("notebook3", swarm.bed.notebooks[1], ["--layers", "9:18", "--leave-after", "60s"])
    assert swarm.wait_on_route("notebook3")["outbound_only"]
    prompt = PROMPTS[0]
    _, expected, _ = reference.run(prompt, N)
    deadline = time.monotonic() + 180
    while notebook.p.poll() is None:
        assert time.monotonic() < deadline, notebook.text()
        assert swarm.ask("generate", prompt=prompt, n=N)["tokens"] == expected
    assert notebook.p.wait(60) == 0 and "--leave-after 60s is up" in notebook.text()
    r = swarm.ask("status")["status"]["recoveries"][-1]
    assert r["node"] == "notebook3" and r["detection"] == "left" and r["path"] in ("migrate", "none"), r
    assert swarm.ask("generate", prompt=prompt, n=N)["tokens"] == expected
