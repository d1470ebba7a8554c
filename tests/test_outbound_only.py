"""An outbound-only node in a real swarm on 127.0.0.1, with the real Gemma 3 270M model.

A coordinator that hosts no layers and two nodes pinned to 0:9 and 9:18; the second joins with
--outbound-only, so the coordinator and the first node reach it only through the coordinator's relay
(its step stream from node0 included). Greedy text must be exactly plain llama-cpp-python's, and stay
so when the outbound-only node is killed with -9 in the middle of a generation. Then the same in network
namespaces, with a node that takes no connection at all and is found out at its join.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from rich.console import Console

from conftest import PROMPTS
from procs import Swarm
from swarm.cli.status import show
from swarm.models import gemma_path

N = 96
KEY = "outbound-key-of-the-tests"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, _private_cache):
    tmp = tmp_path_factory.mktemp("outbound")
    model = gemma_path()  # Gemma 3 270M, 18 layers
    s = Swarm(tmp, model, ["--no-standbys"], [["--layers", "0:9"], ["--layers", "9:18", "--outbound-only"]],
              key=KEY)
    try:
        s.wait_ready()
        yield s
    finally:
        s.close()


def _node(status: dict, name: str) -> dict:
    return next(n for n in status["nodes"] if n["name"] == name)


def test_an_outbound_only_node_is_reached_through_the_relay(swarm, reference):
    status = swarm.client.status()
    relayed, direct = _node(status, "node1"), _node(status, "node0")
    assert relayed["outbound_only"] and not direct["outbound_only"]
    assert relayed["relayed_because"] == "it asked to be (--outbound-only)" and not direct.get("relayed_because")
    console = Console(file=io.StringIO(), width=300)
    show(console, status)  # what `swarm status` prints: the relayed hops, and why
    shown = console.file.getvalue()
    assert "0:9 on node0 -> 9:18 on node1 (relayed)" in shown, shown
    assert ("node1: outbound-only: it asked to be (--outbound-only); every hop into it and out of it goes "
            "through the coordinator's relay") in shown, shown
    assert relayed["state"] == "ready" and relayed["layers"] == {"start": 9, "end": 18}
    # Its address is the relay's port for it, not the port the node serves on.
    served_on = int(swarm.procs[2].text().split("serving on port ")[1].split()[0])
    assert int(relayed["address"].rsplit(":", 1)[1]) != served_on
    assert "peers reach it through the relay" in swarm.procs[2].text()
    assert "outbound-only" in swarm.coordinator.text()
    # The coordinator said where it listens, and that only this machine can join it there.
    assert f"listening on {swarm.address} " in swarm.coordinator.text()
    assert "warning: listening on the loopback interface only" in swarm.coordinator.text()
    for prompt in PROMPTS[:2]:
        _, expected, _ = reference.run(prompt, N)
        assert swarm.client.complete(prompt, max_tokens=N).tokens == expected


def test_kill_9_of_the_outbound_only_node_keeps_the_text(swarm, reference):
    prompt = PROMPTS[2]
    _, expected, _ = reference.run(prompt, N)
    position = random.randrange(4, len(expected) - 8)
    print(f"kill -9 of the outbound-only node after {position} tokens")
    gen = swarm.client.generate(prompt, max_tokens=N)
    killed = False
    for _ in gen:
        if not killed and len(gen.result.tokens) >= position:
            swarm.procs[2].p.send_signal(signal.SIGKILL)
            killed = True
    assert killed
    assert gen.result.tokens == expected
    recoveries = swarm.client.status()["recoveries"]
    assert [r["node"] for r in recoveries] == ["node1"]
    # Every connection to it went through the relay: at least a gRPC channel and a step link.
    relayed = int(swarm.coordinator.text().split("relay: node1 disconnected (")[1].split()[0])
    assert relayed >= 2


FIREWALL = """
table inet swarm_test {
    chain input {
        type filter hook input priority 0; policy accept;
        iif "lo" accept
        ct state established,related accept
        ct state new drop
    }
}
"""


def test_a_node_no_one_can_reach_is_found_out_and_relayed(tmp_path, reference):
    """Coordinator, a node, a firewalled node (it takes no new connection from outside its namespace, like a
    notebook behind NAT) and a client, each in a network namespace of its own. The firewalled node joins
    without --outbound-only: the coordinator finds it cannot reach it and relays to it."""
    from netlab import NetLab
    from procs import Proc

    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.fail("this test makes network namespaces: run the suite as root with iproute2 and nftables")
    prompt = PROMPTS[0]
    _, expected, _ = reference.run(prompt, N)
    model = gemma_path()
    lab = NetLab(4)
    coordinator = f"{lab.address(0)}:7700"
    procs = []
    try:
        subprocess.run([*lab.prefix(2), "nft", "-f", "-"], input=FIREWALL, text=True, check=True, timeout=30)
        procs.append(Proc(["--model", str(model), "--host", lab.address(0), "--port", "7700", "--key", KEY,
                           "--ctx", "512", "--name", "coord", "--mdns-interface", "off", "--no-standbys",
                           "--http-port", "0"], tmp_path / "coordinator.log", prefix=lab.prefix(0)))
        for i, (host, pin) in enumerate([(1, "0:9"), (2, "9:18")]):
            procs.append(Proc(["--key", KEY, "--name", f"node{i}", "--coordinator", coordinator,
                               "--mdns-interface", "off", "--layers", pin], tmp_path / f"node{i}.log",
                              {"SWARM_CACHE_DIR": str(tmp_path / f"node{i}-cache")}, prefix=lab.prefix(host)))
        client = subprocess.Popen([*lab.prefix(3), sys.executable, str(Path(__file__).with_name("netns_client.py")),
                                   coordinator, KEY, prompt, str(N), "3"], stdout=subprocess.PIPE, text=True)
        timer = threading.Timer(400, client.kill)  # bounded: a hang fails the test instead of the suite
        timer.start()
        result = None
        for line in client.stdout:
            result = json.loads(line)
        timer.cancel()
        assert client.wait(30) == 0, "\n".join(p.text()[-2000:] for p in procs)
        assert result["tokens"] == expected
        nodes = {n["name"]: n for n in result["status"]["nodes"]}
        assert nodes["node1"]["outbound_only"] and not nodes["node0"]["outbound_only"], nodes
        assert nodes["node1"]["relayed_because"].startswith("the coordinator could not reach it at "), nodes
        assert nodes["node1"]["address"].startswith(lab.address(0) + ":")
        assert "(it did not answer)" in procs[0].text()
        assert f"listening on {coordinator} " in procs[0].text() and "loopback" not in procs[0].text()
        # The firewall works: from the coordinator's host, the node's own port takes no connection.
        port = int(procs[2].text().split("serving on port ")[1].split()[0])
        probe = subprocess.run([*lab.prefix(0), sys.executable, "-c", "import socket,sys; socket.create_connection("
                                f"('{lab.address(2)}', {port}), timeout=1.5)"], capture_output=True, timeout=30)
        assert probe.returncode != 0
    finally:
        for p in procs:
            p.stop()
        lab.close()
