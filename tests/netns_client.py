"""A client run inside a test host's namespace: wait for the swarm, stream one greedy generation and
print one JSON line per token, then the tokens and the swarm's status (used by test_netns_failover)."""

import json
import sys
import time

from swarm.client import SwarmClient

address, key, prompt, n, nodes = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
with SwarmClient(address, key=key) as client:
    deadline = time.monotonic() + 300
    while True:
        try:
            status = client.status()
            # Every node has joined and holds what the plan gave it: a session begun while the coordinator
            # is ready on its own keeps that first route, and cutting a node would then change nothing.
            if status["state"] == "ready" and len(status["nodes"]) == nodes and all(
                    node["state"] in ("ready", "idle") for node in status["nodes"]):
                break
        except Exception:  # not listening yet
            pass
        if time.monotonic() > deadline:
            sys.exit("the swarm did not get ready")
        time.sleep(0.3)
    print(json.dumps({"ready": True}), flush=True)
    gen = client.generate(prompt, max_tokens=n)
    for _ in gen:
        print(json.dumps({"n": len(gen.result.tokens)}), flush=True)
    print(json.dumps({"tokens": gen.result.tokens, "status": client.status()}), flush=True)
