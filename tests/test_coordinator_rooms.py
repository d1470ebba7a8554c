"""The coordinator's own node and its members, in real processes with the real Gemma 3 270M model.

- The node on the coordinator's machine loads the model file where it lies: before, it fetched the
  whole model from its own coordinator into the shard cache (a second copy of every model run).
- Two nodes started with the same name (two `swarm join` on one host both default to its host name)
  are told apart: the second is suffixed, in `swarm status` and in its own log.
"""

from __future__ import annotations

import time

from conftest import N_TOKENS, PROMPTS
from procs import Proc, Swarm

KEY = "rooms-key-of-the-tests"


def test_the_coordinators_own_node_uses_the_model_file_in_place(tmp_path, model_path, reference):
    cache = tmp_path / "coordinator-cache"
    swarm = Swarm(tmp_path, model_path, [], [], key=KEY, coordinator_env={"SWARM_CACHE_DIR": str(cache)})
    try:
        client = swarm.wait_ready()
        (me,) = client.status()["nodes"]
        assert me["has_layers"] and (me["layers"]["start"], me["layers"]["end"]) == (0, 18)  # the whole model
        assert client.complete(PROMPTS[0], max_tokens=16).tokens == reference.run(PROMPTS[0], N_TOKENS)[1][:16]
        size = model_path.stat().st_size
        copies = [p for p in (cache / "shards").glob("*") if p.is_file() and p.stat().st_size == size]
        assert not copies, f"the model was copied into the shard cache: {copies}"
        assert "fetch and load" not in swarm.coordinator.text()
    finally:
        swarm.close()


def test_two_nodes_with_one_name_are_told_apart(tmp_path, model_path):
    swarm = Swarm(tmp_path, model_path, ["--layers", "0:6"], [["--layers", "6:18", "--name", "box"]], key=KEY)
    try:
        client = swarm.wait_ready()
        # A second node named "box" (as two `swarm join` on one machine both default to its host name).
        twin = Proc(["--host", "127.0.0.1", "--key", KEY, "--name", "box", "--coordinator", swarm.address,
                     "--mdns-interface", "off"], tmp_path / "twin.log",
                    {"SWARM_CACHE_DIR": str(tmp_path / "twin-cache")})
        swarm.procs.append(twin)
        deadline = time.monotonic() + 120
        while len(client.status()["nodes"]) < 3:
            assert twin.p.poll() is None and time.monotonic() < deadline, twin.text()
            time.sleep(0.3)
        names = sorted(n["name"] for n in client.status()["nodes"])
        assert names == ["box", "box-2", "coord"], names
        assert "as box-2 (another node is box)" in twin.text()
    finally:
        swarm.close()
